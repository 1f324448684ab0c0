"""Shared fixtures: free ports, real server processes, real agents, PostgreSQL databases."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

PG_ENV = "QUANTA_TEST_PG_URL"


_EPHEMERAL = (32768, 60999)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return _EPHEMERAL


_GIVEN: set[int] = set()  # ports this test process has handed out (bound or not yet)


def free_port(pair: bool = False, span: int = 1) -> int:
    """A free TCP port for a test listener, chosen BELOW the kernel's ephemeral range, so that no
    outgoing connection can take it between this check and the server binding it. With ``pair``
    (a Switch: client port + poke port) or ``span`` the following ports are free too. A port once
    handed out is not handed out again by this process: a server's ports are chosen one after the
    other before any is bound, and a Switch's poke port (client port + 1) once came out as the
    same server's HTTPS port."""
    import random

    span = max(span, 2 if pair else 1)
    lo = 10000
    hi = min(_ephemeral_range()[0], 32768) - span - 1
    for _ in range(500):
        port = random.randrange(lo, hi)
        if _GIVEN.intersection(range(port, port + span)):
            continue
        socks = []
        try:
            for p in range(port, port + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            _GIVEN.update(range(port, port + span))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


def quanta(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "quanta", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"quanta {' '.join(args)} exited {r.returncode}\nstdout:{r.stdout}\nstderr:{r.stderr}")
    return r


# ------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="session")
def pg_server_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://root@127.0.0.1:5432/test); "
                    "it is not set on this machine, so SQLite alone was tested")
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    from quanta.db import normalise_url

    name = f"quanta_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(normalise_url(pg_server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))  # name is generated above, never user input
    base = sa.engine.make_url(normalise_url(pg_server_url)).set(database=name)
    try:
        yield base.render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url")


# ------------------------------------------------------------------------ processes
@dataclass
class Server:
    root: Path
    https: int
    switch: int
    core: int
    proc: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log: Path | None = None

    def start(self) -> None:
        self.log = self.root / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "quanta", "server", str(self.root)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_until(lambda: _https_ok(self.https), 60, f"web tier on {self.https}", self)
            wait_until(lambda: "linked to core" in self.log_text(), 60, "switch linked to core", self)
        except BaseException:
            self.stop()  # a server that did not come up is not left running behind a failed setup
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def enroll(self, name: str) -> Path:
        out = self.root.parent / "agents" / name
        quanta("enroll", str(self.root), "--device", name, "--out", str(out))
        return out

    def start_agent(self, name: str, agent_dir: Path | None = None) -> subprocess.Popen[bytes]:
        agent_dir = agent_dir or self.root.parent / "agents" / name
        log = open(agent_dir.parent / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "quanta", "agent", str(agent_dir)], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.agents[name] = p
        return p

    def agent_log(self, name: str) -> str:
        f = self.root.parent / "agents" / f"{name}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.agents.pop(name)
        p.send_signal(sig)
        p.wait(15)

    def online(self) -> set[str]:
        import json

        r = quanta("devices", str(self.root), "--json")
        return {d["device_id"] for d in json.loads(r.stdout) if d["online"]}

    def wait_online(self, names: set[str], timeout: float = 30) -> None:
        wait_until(lambda: names <= self.online(), timeout, f"devices {sorted(names)} online", self)

    def pids(self, pattern: str) -> list[int]:
        r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    def stop(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(Exception):
                self.agents[name].kill()
                self.agents[name].wait(5)
        self.agents.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # children of a killed supervisor must not outlive the test
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL) if self.proc else None


def _https_ok(port: int) -> bool:
    try:
        return httpx.get(f"https://127.0.0.1:{port}/Consumer/health", verify=False, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False



def half_open(port: int, n: int) -> list[socket.socket]:
    """n TCP connections to 127.0.0.1:port that never send a byte (a TLS handshake never starts):
    a flood of half-open connections, as a hostile or broken client leaves them."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks

def wait_until(cond, timeout: float, what: str, server: Server | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    extra = f"\n--- server log ---\n{server.log_text()[-4000:]}" if server else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")


def make_server(tmp_path: Path, *extra: str) -> Server:
    root = tmp_path / "server"
    switches = int(extra[extra.index("--switches") + 1]) if "--switches" in extra else 1
    https, switch, core = free_port(), free_port(span=2 * switches), free_port()
    # every listener on its own free port, so tests can run in parallel
    others = [f"{name}={free_port()}" for name in ("http", "hub", "coordinator", "integrate", "interaction")]
    quanta("init", str(root), "--https-port", str(https), "--switch-port", str(switch), "--port", f"core={core}",
           *(x for o in others for x in ("--port", o)), "--server-name", "localhost", *extra)
    return Server(root, https, switch, core)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = make_server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server PKI for ``localhost`` with an empty CRL, as a Switch needs (a test file that wants
    another one defines its own ``pki``)."""
    from quanta.pki import Pki

    made = Pki(tmp_path / "pki")
    made.create("localhost")
    made.write_crl()
    return made
