"""What each component of a server is doing: the supervisors' record of it, checked against the live system.

``quanta server`` keeps ``DIR/run/status.json`` and its Switch Host keeps ``DIR/run/switch-host.status.json``
(:class:`StatusRecord`; 0600 in a 0700 directory, rewritten atomically each time a component starts, dies,
is scheduled for a restart, is given up on or is stopped). A record is only a claim, so ``quanta status``
(:func:`collect`) believes none of it without checking:

- a recorded pid counts only if that process is alive and is the one that was started: its start time and
  its command line must match the record (pids are reused);
- a port counts only if the kernel's socket table shows it listening, held by that component's process
  (a listener of another process on the same port is reported as such). The table is read, no connection
  is made, so a status check leaves no trace in a component's log (a Switch logs every connection to its
  poke port that carries no poke);
- a record whose supervisor is gone (``kill -9`` of ``quanta server``, a crash, a power cut) is *stale*:
  its components are reported ``stopped (stale)``, not running.

One supervisor writes a record at a time: it holds an exclusive lock (``flock``) on the record's ``.lock``
file for its life, which the kernel releases when it dies however it dies. A second ``quanta server`` on
the same directory (refused at its ports a moment later) therefore never overwrites the first one's record.
Readers take no lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quanta.datadir import make_private_dir, write_private

log = logging.getLogger("quanta.status")

RUN_DIR = "run"
SERVER = "server"
SWITCH_HOST = "switch-host"
START_TOLERANCE = 0.05
"""Seconds two readings of one process's start time may differ by (the kernel counts in clock ticks)."""
MAX_RECORD_BYTES = 1 << 20  # a record is a few KiB; a bigger file is not one
STARTUP_GRACE = 60.0
"""Seconds a live component whose ports are not open yet counts as starting; after that, as not listening."""

ROLE_COMPONENTS: dict[str, tuple[str, ...]] = {  # DESIGN §2 topologies: which components ``quanta server`` runs
    "single": ("core", "switch-host", "coordinator", "web", "http", "integrate"),
    "master": ("coordinator", "web", "http", "hub", "integrate"),
    "response": ("core", "switch-host", "web", "hub-client"),
    "dmz": ("switch-host", "web", "hub-client"),
}
SERVER_COMPONENTS = ("core", "switch-host", "coordinator", "web", "http", "integrate", "hub", "hub-client")

EXIT_RUNNING = 0
EXIT_DEGRADED = 1
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4
EXIT_CODES = {
    EXIT_RUNNING: "every configured component is running and listening on its ports",
    EXIT_DEGRADED: "the server runs, but a component is not running (restarting, failed, exited, not listening)",
    2: "not a data directory, or a bad option",
    EXIT_NOT_RUNNING: "the server is not running (stopped, never started here, or its record is stale)",
    EXIT_UNKNOWN: "the status record is unreadable: nothing can be said about the processes",
}


def status_path(root: Path | str, supervisor: str) -> Path:
    """``DIR/run/status.json`` (the server's supervisor) or ``DIR/run/<name>.status.json``."""
    name = "status.json" if supervisor == SERVER else f"{supervisor}.status.json"
    return Path(root) / RUN_DIR / name


# ---------------------------------------------------------------------------- writing (the supervisors)
ChildState = Literal["starting", "running", "restarting", "failed", "stopped"]


class ChildRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    state: ChildState = "starting"
    pid: Optional[int] = Field(None, ge=1, le=2**31)
    started: Optional[float] = None  # the process's start time (seconds since the epoch, from the kernel)
    argv: list[str] = Field([], max_length=64)
    restarts: int = Field(0, ge=0)
    last_error: Optional[str] = Field(None, max_length=2000)
    last_error_at: Optional[float] = None
    next_start_at: Optional[float] = None


class SupervisorRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=64)
    pid: int = Field(ge=1, le=2**31)
    started: float
    argv: list[str] = Field(max_length=256)
    state: Literal["running", "stopping", "stopped"]
    exit_code: Optional[int] = None


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: Literal[1]
    updated_at: float
    supervisor: SupervisorRecord
    children: dict[str, ChildRecord] = Field(max_length=1024)


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None if there is no such live process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def is_process(pid: int | None, started: float | None, argv: list[str]) -> bool:
    """Whether ``pid`` is alive and is the process a record names: same start time, same command line."""
    if not pid or started is None:
        return False
    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < START_TOLERANCE
                and (not argv or proc.cmdline() == argv))
    except psutil.Error:
        return False


class StatusRecord:
    """The record one supervisor keeps of itself and its children. Writing it never stops the supervisor:
    a failed write (a full disk, a removed directory) is logged once and retried at the next change."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        me = psutil.Process()
        self.supervisor = SupervisorRecord(name=name, pid=me.pid, started=me.create_time(), argv=me.cmdline(),
                                           state="running")
        self.children: dict[str, ChildRecord] = {}
        self._warned = False
        self._lock_fd: int | None = None
        self.enabled = self._lock()

    def _lock(self) -> bool:
        try:
            make_private_dir(self.path.parent)
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("cannot keep the status record %s: %s ('quanta status' will not see this server)", self.path, e)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("another supervisor keeps %s; this one does not write it", self.path)
            return False
        self._lock_fd = fd  # held for the process's life; the kernel lets go when it dies
        return True

    def child(self, name: str) -> ChildRecord:
        return self.children.setdefault(name, ChildRecord())

    def write(self) -> None:
        if not self.enabled:
            return
        record = Record(version=1, updated_at=time.time(), supervisor=self.supervisor, children=self.children)
        try:
            write_private(self.path, record.model_dump_json(indent=1).encode())
            self._warned = False
        except OSError as e:
            if not self._warned:
                log.warning("cannot write the status record %s: %s", self.path, e)
            self._warned = True


def read_record(path: Path) -> Record | None:
    """The record at ``path``, None if there is none; ValueError (saying why) if it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"{path} is larger than {MAX_RECORD_BYTES} bytes: not a status record")
    try:
        return Record.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the file"
        raise ValueError(f"{path} is not a status record ({where}: {first['msg']})") from None


# ---------------------------------------------------------------------------- reading (quanta status)
@dataclass
class Port:
    name: str
    host: str
    port: int
    listening: bool = False
    holder: str = ""  # who listens, when it is not the component ("pid 123", "a process of another user")

    def show(self, alive: bool = True) -> str:
        """``https 443``; for a live component whose port is not open: ``closed`` or who holds it."""
        if self.listening or not (alive or self.holder):
            return f"{self.name} {self.port}"
        return f"{self.name} {self.port} " + (f"held by {self.holder}" if self.holder else "closed")


@dataclass
class Component:
    name: str
    serves: str
    configured: bool = True
    state: str = "stopped"
    note: str = ""
    pid: int | None = None  # the live process, when there is one
    last_pid: int | None = None
    started: float | None = None
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    ports: list[Port] = field(default_factory=list)

    def as_json(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "serves": self.serves, "configured": self.configured, "state": self.state,
                "note": self.note or None, "pid": self.pid, "last_pid": self.last_pid, "started": self.started,
                "uptime_s": round(now - self.started, 1) if self.pid and self.started else None,
                "restarts": self.restarts, "last_error": self.last_error, "last_error_at": self.last_error_at,
                "ports": [{"name": p.name, "host": p.host, "port": p.port, "listening": p.listening,
                           "holder": p.holder or None} for p in self.ports]}


@dataclass
class Report:
    root: Path
    role: str
    server: Component
    components: list[Component]
    status_file: Path
    updated_at: float | None = None
    problems: list[str] = field(default_factory=list)  # records that could not be read

    @property
    def exit_code(self) -> int:
        if self.problems and self.server.state == "unknown":
            return EXIT_UNKNOWN
        if self.server.pid is None:
            return EXIT_NOT_RUNNING
        if any(c.configured and c.state != "running" for c in self.components):
            return EXIT_DEGRADED
        return EXIT_RUNNING

    def as_json(self) -> dict[str, Any]:
        now = time.time()
        return {"root": str(self.root), "role": self.role, "status_file": str(self.status_file),
                "updated_at": self.updated_at, "exit_code": self.exit_code, "problems": self.problems,
                "server": self.server.as_json(now), "components": [c.as_json(now) for c in self.components]}


def _serves(name: str, settings: Any) -> str:
    role = settings.role
    if name == "web":
        parts = (["Consumer API", "Portal"] if role in ("single", "master") else []) + \
            (["Core relay (/Core)"] if role in ("single", "response") else []) + ["Background Channel"]
        return "web tier: " + ", ".join(parts)
    if name == "http":
        return "HTTP tier: CRL" + (", Catalog" if settings.catalog_url is None else "")
    return {"core": "Core", "switch-host": "Switch Host (runs the Switches)", "coordinator": "Coordinator",
            "integrate": "Integrate Agent", "hub": "Master hub", "hub-client": "hub client (to the Master hub)"}[name]


def _ports(name: str, settings: Any) -> list[Port]:
    from quanta.metrics import metrics_port

    public, internal = settings.bind_host, settings.internal_host
    ports = {"core": [("core", internal, settings.port("core"))],
             "coordinator": [("coordinator", internal, settings.port("coordinator"))],
             "web": [("https", public, settings.port("https"))],
             "http": [("http", public, settings.port("http"))],
             "integrate": [("integrate", "127.0.0.1", settings.port("integrate"))],
             "hub": [("hub", public, settings.port("hub"))]}.get(name, [])
    metrics = metrics_port(settings, name) if name in ("core", "coordinator", "web", "integrate") else None
    return [Port(*p) for p in ports] + ([Port("metrics", internal, metrics)] if metrics else [])


def _listeners() -> dict[int, set[int | None]]:
    """Listening TCP ports (the kernel's table) and the pids holding them (None: not visible to this user)."""
    held: dict[int, set[int | None]] = {}
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return held
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr:
            held.setdefault(c.laddr.port, set()).add(c.pid)
    return held


def _check_ports(c: Component, listeners: dict[int, set[int | None]]) -> None:
    for p in c.ports:
        holders = listeners.get(p.port, set())
        p.listening = c.pid is not None and (c.pid in holders or (None in holders and len(holders) == 1))
        if not p.listening and holders:
            p.holder = ", ".join("a process of another user" if h is None else f"pid {h}"
                                 for h in sorted(holders, key=lambda x: x or 0))


def _supervisor_state(rec: Record | None, name: str, serves: str) -> Component:
    c = Component(name, serves)
    if rec is None:
        c.note = "never started here"
        return c
    s = rec.supervisor
    c.last_pid, c.started, c.restarts = s.pid, s.started, 0
    alive = is_process(s.pid, s.started, s.argv)
    if alive:
        c.pid = s.pid
        c.state = "running" if s.state == "running" else "stopping"
    elif s.state == "stopped":
        c.state = "stopped" if not s.exit_code else "failed"
        if s.exit_code:
            c.last_error = f"stopped every component with code {s.exit_code} (a component could not be run)"
    else:
        c.state = "stopped (stale)"
        c.note = f"pid {s.pid} is gone without recording its stop: kill -9, a crash or a power cut"
    return c


def _child_state(c: Component, rec: ChildRecord | None, supervisor: Component) -> None:
    """Fill ``c`` from its record, believing only what the live system confirms."""
    if rec is None:
        if supervisor.pid is not None and supervisor.state == "running":
            c.note = "not started by the running supervisor (its settings changed since it started? restart it)"
        return
    c.last_pid, c.restarts, c.last_error, c.last_error_at = rec.pid, rec.restarts, rec.last_error, rec.last_error_at
    alive = is_process(rec.pid, rec.started, rec.argv)
    if alive:
        c.pid, c.started = rec.pid, rec.started
    if supervisor.pid is not None:  # a live supervisor: its record is current, up to the last moments
        if rec.state == "running":
            c.state = "running" if alive else "exited"
            if not alive:
                c.note = "its process is gone; the supervisor has not recorded that yet"
        elif rec.state == "stopped" and alive:
            c.state = "stopping"
        else:
            c.state = rec.state
        if rec.state == "restarting" and rec.next_start_at:
            c.note = f"next start in {max(0.0, rec.next_start_at - time.time()):.1f} s"
        return
    if alive:
        c.state = "orphaned"
        c.note = f"runs without its supervisor: stop it with 'kill -- -{rec.pid}' (its process group)"
    elif rec.state in ("running", "starting", "restarting") and supervisor.state == "stopped (stale)":
        c.state = "stopped (stale)"
    else:
        c.state = "failed" if rec.state == "failed" else "stopped"


def running_supervisor(root: Path | str) -> int | None:
    """The pid of the ``quanta server`` running on ``root`` (its record names it and it is that process), or None."""
    try:
        rec = read_record(status_path(root, SERVER))
    except ValueError:
        return None
    return rec.supervisor.pid if rec and is_process(rec.supervisor.pid, rec.supervisor.started, rec.supervisor.argv) \
        else None


def _read(path: Path, problems: list[str]) -> Record | None:
    try:
        return read_record(path)
    except ValueError as e:
        problems.append(str(e))
        return None


def _switches(root: Path, settings: Any, host_record: Record | None) -> list[Component]:
    """The Switch components of this host: every row of SwitchConfiguration for it (when the database cannot
    be read, the Switches the Switch Host's record names, ports unknown)."""
    from quanta.metrics import metrics_port
    from quanta.switch.main import local_switch_rows

    try:
        rows = local_switch_rows(root)
    except Exception as e:  # noqa: BLE001 - the database may be down: say so, show what the record knows
        names = [n.partition(":")[2] for n in (host_record.children if host_record else {})]
        why = f"SwitchConfiguration not readable ({type(e).__name__}): ports unknown"
        return [Component(f"switch:{n}", f"Switch {n}", note=why) for n in names]
    out = []
    for index, r in enumerate(rows):
        c = Component(f"switch:{r['Name']}", f"Switch {r['Name']}", configured=bool(r["Enabled"]))
        c.ports = [Port("switch", settings.bind_host, int(r["Port"])), Port("poke", settings.bind_host, int(r["Port"]) + 1)]
        metrics = metrics_port(settings, "switch", index)
        if metrics:
            c.ports.append(Port("metrics", settings.internal_host, metrics))
        if not c.configured:
            c.state, c.note = "not configured", "disabled in SwitchConfiguration"
        out.append(c)
    return out


def collect(root: Path, settings: Any) -> Report:
    """Every component the server in ``root`` runs by its role and settings, as the live system confirms it."""
    problems: list[str] = []
    path = status_path(root, SERVER)
    rec = _read(path, problems)
    server = _supervisor_state(rec, "server", "supervisor (quanta server)")
    if problems:
        server.state, server.note = "unknown", problems[0]
    mine = ROLE_COMPONENTS[settings.role]
    components: list[Component] = []
    for name in SERVER_COMPONENTS:
        c = Component(name, _serves(name, settings), configured=name in mine, ports=_ports(name, settings))
        if not c.configured:
            c.state, c.note, c.ports = "not configured", f"role {settings.role}", []
        else:
            _child_state(c, rec.children.get(name) if rec else None, server)
        components.append(c)
        if name == "switch-host" and c.configured:
            host_rec = _read(status_path(root, SWITCH_HOST), problems)
            host = _supervisor_state(host_rec, SWITCH_HOST, "")
            switches = _switches(root, settings, host_rec)
            for s in switches:
                if s.configured:
                    _child_state(s, host_rec.children.get(s.name) if host_rec else None, host)
                    if c.pid is None and s.pid is None and s.state != "stopped (stale)":
                        s.note = s.note or "its Switch Host is not running"
            components += switches
    listeners = _listeners()
    for c in components:
        if c.configured:
            _check_ports(c, listeners)
            if c.state == "running" and not all(p.listening for p in c.ports):
                young = c.started is not None and time.time() - c.started < STARTUP_GRACE
                c.state = "starting" if young and not any(p.holder for p in c.ports) else "not listening"
    return Report(Path(root), settings.role, server, components, path, rec.updated_at if rec else None, problems)


# ---------------------------------------------------------------------------- printing
def duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``3h 2m``, ``4d 1h``."""
    s = int(max(seconds, 0))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // subsize}{sub}"
    return f"{s}s"


def utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


COLUMNS = ("COMPONENT", "SERVES", "STATE", "PORTS", "PID", "UPTIME", "RESTARTS", "LAST ERROR")


def rows(report: Report) -> list[list[Any]]:
    now = time.time()
    out = []
    for c in [report.server, *report.components]:
        state = c.state + (f" ({c.note})" if c.note else "")
        error = f"{c.last_error} at {utc(c.last_error_at)}" if c.last_error and c.last_error_at else (c.last_error or "")
        restarts = c.restarts if c.configured and c is not report.server else ""
        out.append([c.name, c.serves, state, ", ".join(p.show(c.pid is not None) for p in c.ports), c.pid or "",
                    duration(now - c.started) if c.pid and c.started else "", restarts, error])
    return out
