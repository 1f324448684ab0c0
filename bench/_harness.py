"""Shared by the benchmarks: a throw-away Quanta server with S Switches, a simulated fleet,
and CPU/RSS accounting per component (psutil)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PY = sys.executable


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    # SO_REUSEADDR as the servers themselves bind: a port with connections in TIME_WAIT (plenty
    # after a 10,000-connection run) is free for them.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(pair: bool = False) -> int:
    """A free port *below* the kernel's ephemeral range: the floor rig's and the simulator's
    thousands of client connections take their source ports from that range, and one of them on
    a server port (a Switch's poke port, say) would stop the server from starting. ``pair``: the
    next 7 ports are free too (room for several Switches: port, port+1, port+2, ...)."""
    import random

    high = _ephemeral_low() - 8
    for _ in range(500):
        port = random.randrange(20000, high)
        if all(_bindable(port + extra) for extra in range(8 if pair else 1)):
            return port
    raise RuntimeError("no free port")


def quanta(*args: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    r = subprocess.run([PY, "-m", "quanta", *args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"quanta {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class BenchServer:
    root: Path
    switches: int
    database_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def init(self) -> None:
        self.https, self.switch, self.core = free_port(), free_port(pair=True), free_port()
        args = ["init", str(self.root), "--https-port", str(self.https), "--switch-port", str(self.switch),
                "--port", f"core={self.core}", "--switches", str(self.switches), "--server-name", "localhost"]
        # every other listener on a free port too, so another server on this machine (a test's, a
        # leftover) cannot make the bench's fail to start
        for name in ("http", "coordinator", "integrate", "hub"):
            args += ["--port", f"{name}={free_port()}"]
        if self.database_url:
            args += ["--database-url", self.database_url]
        quanta(*args)
        self.log = self.root / "server.log"
        # Prometheus endpoints for the Core and the Switches (Switch n on switch + n - 1): the bench
        # reads each question's milestones there (quanta.metrics.Milestones)
        from quanta.settings import load_settings, save_settings

        s = load_settings(self.root)
        self.metrics_core, self.metrics_switch = free_port(), free_port(pair=True)
        save_settings(self.root, s.model_copy(update={"metrics_ports": {
            **s.metrics_ports, "core": self.metrics_core, "switch": self.metrics_switch}}))

    def start(self) -> None:
        env = dict(os.environ, QUANTA_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen([PY, "-m", "quanta", "server", str(self.root)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_until(lambda: self.log_text().count("linked to core") >= self.switches, 180, "switches linked")
        wait_until(self._https_ok, 30, "web tier")

    def _https_ok(self) -> bool:
        import httpx

        try:
            return httpx.get(f"https://127.0.0.1:{self.https}/Consumer/health", verify=False, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def milestones(self) -> dict[str, tuple[int, dict[str, float]]]:
        """component ("core", "switch-1", ...) -> (instruction id, {event: Unix time}) from each
        component's /metrics (see quanta.metrics.Milestones)."""
        out = {"core": scrape_milestones(self.metrics_core, "core")}
        for i in range(self.switches):
            out[f"switch-{i + 1}"] = scrape_milestones(self.metrics_switch + i, "switch")
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def components(self) -> dict[str, psutil.Process]:
        """name -> process for core, web and each switch."""
        assert self.proc is not None
        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "quanta" not in argv:
                continue
            rest = argv[argv.index("quanta") + 1:]
            if rest[:1] == ["switch"]:
                out[f"switch:{rest[-1]}"] = child
            elif rest[:1] in (["core"], ["web"]):
                out[rest[0]] = child
        return out

    def switch_pids(self) -> list[int]:
        return [p.pid for n, p in self.components().items() if n.startswith("switch:")]

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def scrape_milestones(port: int, component: str) -> tuple[int, dict[str, float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    iid, times = -1, {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == f"quanta_{component}_milestone_instruction":
                iid = int(smp.value)
            elif smp.name == f"quanta_{component}_milestone_seconds":
                times[smp.labels["event"]] = smp.value
    return iid, times


def cpu_of(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            t = p.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = 0.0
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - v for k, v in before.items()}


def sim_procs(runner) -> dict[str, psutil.Process]:  # type: ignore[no-untyped-def]
    return {f"simulate-{i}": psutil.Process(p.pid) for i, p in enumerate(runner.procs)}


def machine() -> str:
    import platform

    import picows
    import uvloop

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, picows {picows.__version__}, uvloop {uvloop.__version__}, "
            f"OpenSSL {__import__('ssl').OPENSSL_VERSION.split()[1]}")
