"""A small Consumer API client for the CLI, tests and benchmarks.

It is light on purpose: ``quanta ask`` loads it before anything else (see :mod:`quanta.entry`),
so it uses the standard library's ``http.client`` over one kept-alive TLS connection, and loads
neither httpx, nor rich (only for a progress bar), nor the settings model.

Logging in as the installation's administrator (the default, from ``DIR/admin.credentials``)
verifies a deliberately slow password hash on the server, so the token is cached in
``DIR/consumer.token`` (mode 0600, like the credentials next to it) and reused until it expires or
the server refuses it; then the client logs in again. Explicit ``--user`` logins are not cached.

From a workstation, :meth:`ConsumerClient.for_profile` uses a profile stored by ``quanta login``
(:mod:`quanta.profiles`): its token is cached under the user's config directory, and no password
is kept, so a refused (expired) token is "session expired: run quanta login again" unless the
profile names a password file to log in with again.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from quanta.datadir import DataDir
from quanta.states import DONE_STATES, FINAL_STATES

ANSWERED = ("success", "nocontent", "error", "notapplicable")
TOKEN_FILE = "consumer.token"
TOKEN_MARGIN = 60.0  # a cached token this close to its expiry is not used
json_loads = json.loads  # ConsumerClient._call takes a ``json`` argument, as httpx does


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


def consumer_port(root: Path) -> int:
    """The web tier's HTTPS port from ``DIR/quanta.toml`` (``quanta init`` writes every port)."""
    path = DataDir(Path(root)).config
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 'quanta init {root}' first")
    ports = tomllib.loads(path.read_text()).get("ports", {})
    if "https" in ports:
        return int(ports["https"])
    from quanta.settings import load_settings  # a hand-written file without the port: its default

    return load_settings(root).port("https")


def read_password_file(path: Path) -> str:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiError(f"cannot read the password file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text:
        raise ApiError(f"the password file {path} is empty")
    return text


class TokenCache:
    """One cached API token in a file readable by its owner only."""

    def __init__(self, path: Path, base_url: str, username: str) -> None:
        self.path, self.base_url, self.username = path, base_url, username

    def load(self, now: float | None = None) -> str | None:
        try:
            d = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        now = time.time() if now is None else now
        if (not isinstance(d, dict) or d.get("url") != self.base_url or d.get("username") != self.username
                or not isinstance(d.get("token"), str) or not isinstance(d.get("expires_at"), (int, float))
                or d["expires_at"] - TOKEN_MARGIN <= now):
            return None
        return d["token"]

    def store(self, token: str, expires_at: float) -> None:
        """Write atomically with mode 0600 from the start; a read-only data directory only
        means no caching."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return
        data = json.dumps({"url": self.base_url, "username": self.username, "token": token,
                           "expires_at": expires_at}).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass

    def clear(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


WAIT_STEP = 25.0  # longest single long poll; the HTTP timeout is 30 s


class ConsumerClient:
    def __init__(self, base_url: str, ca_file: Path | None, username: str, password: str | None,
                 token_cache: TokenCache | None = None, relogin_hint: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        scheme, _, rest = self.base_url.partition("://")
        host, _, port = rest.partition(":")
        self._host, self._port = host, int(port or (443 if scheme == "https" else 80))
        self._tls = scheme == "https"
        self._ca_file = ca_file
        try:
            self._ctx = (ssl.create_default_context(cafile=str(ca_file)) if ca_file else
                         ssl.create_default_context()) if self._tls else None
        except (OSError, ssl.SSLError) as e:
            raise ApiError(f"cannot use the CA certificate {ca_file}: {e}") from None
        self._conn: http.client.HTTPConnection | None = None
        self._http: Any = None
        self._username, self._password = username, password
        self._relogin_hint = relogin_hint or "session expired: run quanta login again"
        self._cache = token_cache
        self.token: str | None = token_cache.load() if token_cache else None
        self.token_from_cache = self.token is not None
        if self.token is None:
            self._login()

    @classmethod
    def for_data_dir(cls, root: Path, username: str | None = None, password: str | None = None,
                     cache_token: bool = True) -> ConsumerClient:
        """Log in as ``username`` or, by default, as the administrator created at init (whose
        token is cached in the data directory unless ``cache_token`` is false)."""
        dd = DataDir(Path(root))
        if not Path(root).is_dir():
            raise ApiError(f"{root} is not a directory: give a server data directory (made by 'quanta init')")
        try:
            base_url = f"https://localhost:{consumer_port(root)}"
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ApiError(f"{dd.config}: {e}") from None
        except FileNotFoundError:
            raise ApiError(f"{root} is not a Quanta data directory (no quanta.toml): run 'quanta init {root}' "
                           "first") from None
        try:
            user, pw = read_credentials(dd.admin_credentials)
        except (OSError, KeyError, ValueError) as e:
            raise ApiError(f"cannot read the administrator credentials {dd.admin_credentials}: "
                           f"{e.strerror if isinstance(e, OSError) else 'no username/password lines'} "
                           "(run this on the server as its owner, or use 'quanta login')") from None
        cache = TokenCache(Path(root) / TOKEN_FILE, base_url, user) if cache_token else None
        if username is not None:
            user, pw, cache = username, password or "", None
        return cls(base_url, dd.pki / "ca.crt", user, pw, token_cache=cache)

    @classmethod
    def for_profile(cls, name: str | None = None) -> ConsumerClient:
        """Log in with a profile stored by ``quanta login`` (the default one if ``name`` is None)."""
        from quanta import profiles

        try:
            p = profiles.load(name)
        except profiles.ProfileError as e:
            raise ApiError(str(e)) from None
        password = None
        if p.password_file is not None:
            password = read_password_file(p.password_file)
        hint = f"session expired: run 'quanta login {p.url} --user {p.user} --profile {p.name}' again"
        token_file = profiles.token_path(p.name)
        return cls(p.url, p.ca, p.user, password, token_cache=TokenCache(token_file, p.url, p.user),
                   relogin_hint=hint)

    def __enter__(self) -> ConsumerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def http(self) -> Any:
        """An ``httpx.Client`` on the same server with this client's token, for calls this class
        has no method for (loaded on first use)."""
        if self._http is None:
            import httpx

            self._http = httpx.Client(base_url=self.base_url, verify=self._ctx or True, timeout=30)
            self._http.headers["Authorization"] = f"Bearer {self.token}"
        return self._http

    # -------------------------------------------------------------------- transport
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._tls:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=30, context=self._ctx)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        return self._conn

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request on the kept-alive connection; a connection the server closed while idle
        is reopened once."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, url, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.will_close:
                    self._conn = None
                    conn.close()
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                self._conn = None
                if attempt:
                    raise ApiError(f"cannot reach the Consumer API at {self.base_url}: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._conn = None
                raise ApiError(f"cannot reach the Consumer API at {self.base_url}: {e}") from None
        raise AssertionError("unreachable")

    def _request(self, method: str, url: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                 auth: bool = True) -> tuple[int, bytes]:
        if params:
            url = f"{url}?{urlencode(params)}"
        headers = {"Accept": "application/json"}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        if auth and self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return self._send(method, url, body, headers)

    def _call(self, method: str, url: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        status, data = self._request(method, url, json_body=json, params=params)
        if status == 401 and self.token is not None:
            # The token expired (sessions are short-lived: idle minutes end one) or was revoked:
            # log in once and repeat the request (authentication runs first on every route, so the
            # refused request changed nothing). Without a password (a profile keeps none) that is
            # the end of the session.
            if self._password is None:
                if self._cache is not None:
                    self._cache.clear()
                raise ApiError(self._relogin_hint, 401)
            self._login()
            status, data = self._request(method, url, json_body=json, params=params)
        return self._decode(status, data)

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        text = data.decode("utf-8", "replace")
        if status >= 400:
            try:
                detail = json_loads(text).get("detail", text)
            except (ValueError, AttributeError):
                detail = text
            if isinstance(detail, dict) and "error" in detail:
                detail = detail["error"]
            raise ApiError(f"{status}: {detail}", status)
        return json_loads(text)

    def _login(self) -> None:
        self.token, self.token_from_cache = None, False
        if self._cache is not None:
            self._cache.clear()
        if self._password is None:
            raise ApiError(self._relogin_hint, 401)
        status, data = self._request("POST", "/Consumer/Authentication/Token", auth=False,
                                     json_body={"username": self._username, "password": self._password})
        t = self._decode(status, data)
        self.token = t["token"]
        if self._http is not None:
            self._http.headers["Authorization"] = f"Bearer {self.token}"
        if self._cache is not None:
            self._cache.store(t["token"], float(t["expires_at"]))

    # -------------------------------------------------------------------- API
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

    def wait(self, iid: int, timeout: float, progress: Any = None) -> dict[str, Any]:
        """The status once the instruction is done or ``timeout`` passes, by long poll (the
        server answers the moment it ends). With a rich Console ``progress``, a bar shows the
        answers so far, refreshed every half second."""
        deadline = time.monotonic() + timeout
        bar = None
        if progress is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("[bold]instruction {task.fields[iid]}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[states]}"), TimeElapsedColumn(), console=progress, transient=False)
            bar.start()
            task = bar.add_task("answers", total=None, iid=iid, states="")
        try:
            while True:
                step = max(0.0, min(deadline - time.monotonic(), 0.5 if bar is not None else WAIT_STEP))
                try:
                    s = self._call("GET", f"/Consumer/Instructions/{iid}/Wait", params={"timeout": f"{step:.3f}"})
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
                if s["status"] in DONE_STATES or time.monotonic() >= deadline:
                    return s
        finally:
            if bar is not None:
                bar.stop()

    def decide(self, iid: int, verb: str, *, code: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """verb: Approve, Reject or ApprovalCode."""
        body = {} if verb == "ApprovalCode" else {"code": code, "reason": reason}
        return self._call("POST", f"/Consumer/Instructions/{iid}/{verb}", json=body)

    def results(self, iid: int, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """One page of devices, each device's answer whole: ``/Responses?paging=device``, asked by
        name (the route's default pages by result rows). Device order is stable while answers
        arrive, so paging through every device sees each once. A server older than row paging
        ignores the parameter and answers this shape anyway."""
        return self._call("GET", f"/Consumer/Instructions/{iid}/Responses",
                          params={"paging": "device", "offset": offset, "limit": limit})["items"]

    def all_results(self, iid: int) -> list[dict[str, Any]]:
        """Every device's answer (of the devices the caller may see), by :meth:`results`."""
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


    def instructions(self, offset: int = 0, limit: int = 50, status: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if status:
            params["status"] = status
        return self._call("GET", "/Consumer/Instructions", params=params)

    def export(self, iid: int, fmt: str, sink: Any) -> bool:
        """Stream ``GET /Consumer/Instructions/{id}/Export?format=FMT`` into ``sink`` (a binary
        file); False if this server has no such route (404/405 with no instruction error), so the
        caller pages /Responses instead."""
        url = f"/Consumer/Instructions/{iid}/Export?{urlencode({'format': fmt})}"
        for attempt in (0, 1):
            headers = {"Accept": "*/*", "Authorization": f"Bearer {self.token}"}
            conn = self._connection()
            try:
                conn.request("GET", url, headers=headers)
                r = conn.getresponse()
                if r.status == 401 and self.token_from_cache and attempt == 0:
                    r.read()
                    if self._password is None:
                        raise ApiError(self._relogin_hint, 401)
                    self._login()
                    continue
                if r.status in (404, 405):
                    data = r.read()
                    # a route that does not exist answers {"detail": "Not Found"}; an unknown
                    # instruction names itself
                    try:
                        detail = json_loads(data).get("detail")
                    except (ValueError, AttributeError):
                        detail = None
                    if r.status == 405 or detail in ("Not Found", "Method Not Allowed"):
                        return False
                    self._decode(r.status, data)
                if r.status >= 400:
                    self._decode(r.status, r.read())
                while True:
                    chunk = r.read(65536)
                    if not chunk:
                        break
                    sink.write(chunk)
                self._conn = None
                conn.close()
                return True
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._conn = None
                raise ApiError(f"cannot reach the Consumer API at {self.base_url}: {e}") from None
        return False
