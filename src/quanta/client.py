"""A small Consumer API client for the CLI, tests and benchmarks."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quanta.instructions import DONE_STATES
from quanta.protocol import FINAL_STATES
from quanta.settings import DataDir, load_settings

ANSWERED = ("success", "nocontent", "error", "notapplicable")


class ApiError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """The server is there but a dependency (its database) is not: worth retrying."""
        return self.status == 503


def parse_param(item: str) -> tuple[str, Any]:
    """NAME=VALUE with VALUE typed as int, float, bool or string."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ApiError(f"parameter {item!r} is not NAME=VALUE")
    v: Any = value
    if value.lower() in ("true", "false"):
        v = value.lower() == "true"
    else:
        for cast in (int, float):
            try:
                v = cast(value)
                break
            except ValueError:
                pass
    return name, v


def read_credentials(path: Path) -> tuple[str, str]:
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return values["username"], values["password"]


class ConsumerClient:
    def __init__(self, base_url: str, ca_file: Path | None, username: str, password: str) -> None:
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.http = httpx.Client(base_url=base_url, verify=verify, timeout=30)
        self._login(username, password)

    @classmethod
    def for_data_dir(cls, root: Path, username: str | None = None, password: str | None = None) -> ConsumerClient:
        """Log in as ``username`` or, by default, as the administrator created at init."""
        settings = load_settings(root)
        dd = DataDir(Path(root))
        user, pw = read_credentials(dd.admin_credentials)
        if username is not None:
            user, pw = username, password or ""
        password = pw
        return cls(f"https://localhost:{settings.port('https')}", dd.pki / "ca.crt", user, password)

    def __enter__(self) -> ConsumerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach the Consumer API at {self.http.base_url}: {e}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except json.JSONDecodeError:
                detail = r.text
            if isinstance(detail, dict) and "error" in detail:
                detail = detail["error"]
            raise ApiError(f"{r.status_code}: {detail}", r.status_code)
        return r.json()

    def _login(self, username: str, password: str) -> None:
        t = self._call("POST", "/Consumer/Authentication/Token", json={"username": username, "password": password})
        self.http.headers["Authorization"] = f"Bearer {t['token']}"

    def issue(self, payload: str | None, *, devices: list[str] | None = None, instruction_ttl: int | None = 60,
              parameters: dict[str, Any] | None = None, name: str = "adhoc",
              definition: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"devices": devices or None, "instruction_ttl": instruction_ttl,
                                "parameters": parameters or {}}
        if definition is not None:
            body["definition"] = definition
        else:
            body |= {"payload": payload, "name": name}
        return self._call("POST", "/Consumer/Instructions", json=body)

    def status(self, iid: int) -> dict[str, Any]:
        return self._call("GET", f"/Consumer/Instructions/{iid}")

    def wait(self, iid: int, timeout: float, progress: Console | None = None) -> dict[str, Any]:
        """Poll until the instruction is finished or ``timeout`` passes; show a bar if asked."""
        deadline = time.monotonic() + timeout
        bar = None
        if progress is not None:
            bar = Progress(TextColumn("[bold]instruction {task.fields[iid]}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[states]}"), TimeElapsedColumn(), console=progress, transient=False)
            bar.start()
            task = bar.add_task("answers", total=None, iid=iid, states="")
        try:
            while True:
                try:
                    s = self.status(iid)
                except ApiError as e:
                    if not e.transient or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
                    continue
                if bar is not None:
                    done = sum(v for k, v in s["states"].items() if k in ANSWERED or
                               (s["status"] != "active" and k in FINAL_STATES))
                    states = " ".join(f"{k}={v}" for k, v in sorted(s["states"].items()))
                    bar.update(task, total=max(s["targeted"], 1), completed=done, states=states)
                if s["status"] in DONE_STATES or time.monotonic() > deadline:
                    return s
                time.sleep(0.2)
        finally:
            if bar is not None:
                bar.stop()

    def decide(self, iid: int, verb: str, *, code: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """verb: Approve, Reject or ApprovalCode."""
        body = {} if verb == "ApprovalCode" else {"code": code, "reason": reason}
        return self._call("POST", f"/Consumer/Instructions/{iid}/{verb}", json=body)

    def results(self, iid: int, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        return self._call("GET", f"/Consumer/Instructions/{iid}/Responses",
                          params={"offset": offset, "limit": limit})["items"]

    def all_results(self, iid: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self._retrying(self.results, iid, len(out), 1000)
            out += page
            if len(page) < 1000:
                return out

    @staticmethod
    def _retrying(fn: Any, *args: Any, attempts: int = 30) -> Any:
        for i in range(attempts):
            try:
                return fn(*args)
            except ApiError as e:
                if not e.transient or i == attempts - 1:
                    raise
                time.sleep(1)

    def devices(self) -> list[dict[str, Any]]:
        return self._call("GET", "/Consumer/Devices")
