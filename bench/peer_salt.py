"""Quanta against Salt, the Python peer: ``salt '*' test.ping`` and Quanta's equivalent question
at K real agent processes each, side by side in the same run.

    python bench/peer_salt.py [--k 10 50 100] [--rounds 3] [--quick]

Salt is installed with pip into its own virtual environment, ``bench/.venv-salt`` (never into
Quanta's), on first use. Both sides run on this machine, one after the other in the same run,
each with the machine to itself: a salt-master with K salt-minion processes (auto-accepted keys,
loopback), then a ``quanta server`` with K ``quanta agent`` processes (real certificates, real
TLS). Each side is timed from its own CLI, wall clock, after 2 s of rest: ``salt '*' test.ping``
and ``quanta ask DIR '@x = Agent.GetSummary();'`` (the ``quanta`` console script), median of
``--rounds``; also the same question through the Consumer API from an already logged-in client
(no CLI start-up), as ``api_ratio``. Memory per agent is the idle RSS of each minion / agent
process (its whole process tree); idle CPU is what each fleet uses while nobody asks.
``--quick``: K = 10. The last line holds ``ratio=`` = Salt time / Quanta time at the largest K
(target >= 50 at K = 100).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from _harness import PY, BenchServer, cpu_of, free_port, machine, wait_until  # noqa: E402

HERE = Path(__file__).resolve().parent
SALT_VENV = HERE / ".venv-salt"
SALT_SPEC = "salt>=3006"
SETTLE = 2.0  # seconds of rest before each timed command
IDLE_WINDOW = 5.0  # seconds over which a fleet's idle CPU is measured


def ensure_salt() -> Path:
    """Salt's own venv (created once); returns its bin directory."""
    bin_dir = SALT_VENV / "bin"
    if not (bin_dir / "salt-master").exists():
        print(f"# installing {SALT_SPEC} into {SALT_VENV} (its own virtual environment)", flush=True)
        base = shutil.which("python3.11") or shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(SALT_VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", SALT_SPEC], check=True)
    return bin_dir


def process_tree(procs: list[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    """Each process with every descendant it has now (gone ones left out)."""
    out: list[psutil.Process] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(p.pid)
            out += [root, *root.children(recursive=True)]
    return out


def rss_per_agent(fleet: list[subprocess.Popen[bytes]]) -> float:
    """Mean RSS of one fleet member with its whole process tree."""
    def rss(p: subprocess.Popen[bytes]) -> int:
        with contextlib.suppress(psutil.Error):
            return sum(x.memory_info().rss for x in process_tree([p]))
        return 0

    return statistics.mean(rss(p) for p in fleet)


def idle_cpu(fleet: list[subprocess.Popen[bytes]], seconds: float = IDLE_WINDOW) -> float:
    """CPU seconds per second that a fleet's processes use while nobody asks anything."""
    procs = {str(x.pid): x for x in process_tree(fleet)}
    c0 = sum(cpu_of(procs).values())
    time.sleep(seconds)
    return (sum(cpu_of(procs).values()) - c0) / seconds


def timed(argv: list[str], **kw) -> tuple[float, subprocess.CompletedProcess[str]]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    return time.perf_counter() - t, r


# ----------------------------------------------------------------------------- Salt
class SaltSide:
    def __init__(self, work: Path, k: int, bin_dir: Path) -> None:
        self.work, self.k, self.bin = work, k, bin_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.minions: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        pub, ret = free_port(), free_port()
        m = self.work / "master"
        m.mkdir(parents=True)
        (m / "master").write_text(
            f"root_dir: {m}\npki_dir: {m}/pki\ncachedir: {m}/cache\nsock_dir: {m}/sock\nlog_file: {m}/master.log\n"
            f"interface: 127.0.0.1\npublish_port: {pub}\nret_port: {ret}\nauto_accept: True\nuser: root\n"
            f"worker_threads: 4\nkey_logfile: {m}/key.log\n")
        log = open(self.work / "salt.log", "ab")
        self.procs.append(subprocess.Popen([str(self.bin / "salt-master"), "-c", str(m), "-l", "warning"],
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(2)
        for i in range(self.k):
            d = self.work / f"minion-{i}"
            d.mkdir()
            (d / "minion").write_text(
                f"id: minion-{i}\nmaster: 127.0.0.1\nmaster_port: {ret}\npublish_port: {pub}\nroot_dir: {d}\n"
                f"pki_dir: {d}/pki\ncachedir: {d}/cache\nsock_dir: {d}/sock\nlog_file: {d}/minion.log\nuser: root\n"
                f"acceptance_wait_time: 1\n")
            self.minions.append(subprocess.Popen([str(self.bin / "salt-minion"), "-c", str(d), "-l", "warning"],
                                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self.conf = m

    def ping(self, timeout: int = 60) -> tuple[float, int]:
        dt, r = timed([str(self.bin / "salt"), "-c", str(self.conf), "*", "test.ping", "--timeout", str(timeout),
                       "--out", "txt"], timeout=timeout + 60)
        return dt, r.stdout.count(": True")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120 + self.k * 2
        while time.monotonic() < deadline:
            try:
                _, n = self.ping(timeout=10)
            except subprocess.TimeoutExpired:  # the salt CLI itself can hang while the minions start
                n = 0
            if n >= self.k:
                return
            time.sleep(2)
        raise TimeoutError(f"only some of {self.k} salt minions answer")

    @property
    def fleet(self) -> list[subprocess.Popen[bytes]]:
        return self.minions

    def stop(self) -> None:
        # Salt's daemons fork workers that may leave the process group: collect every
        # descendant first, kill them all, and wait until they are gone, so that nothing of
        # Salt still runs while the Quanta side is measured.
        tree = process_tree(self.minions + self.procs)
        for p in self.minions + self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for x in tree:
            with contextlib.suppress(psutil.Error):
                x.kill()
        psutil.wait_procs(tree, timeout=30)
        for p in self.minions + self.procs:
            with contextlib.suppress(Exception):
                p.wait(5)


# ----------------------------------------------------------------------------- Quanta
class QuantaSide:
    def __init__(self, work: Path, k: int) -> None:
        self.work, self.k = work, k
        self.server = BenchServer(work / "server", 1)
        self.agents: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        from quanta.agent.config import write_conf
        from quanta.db import make_engine, store
        from quanta.pki import Pki
        from quanta.settings import DataDir, load_settings

        self.server.init()
        root = self.server.root
        settings = load_settings(root)
        dd = DataDir(root)
        pki = Pki(dd.pki)
        pairs = []
        for i in range(self.k):
            d = self.work / "agents" / f"agent-{i}"
            d.mkdir(parents=True)
            cert = pki.issue(f"agent-{i}", d / "device.crt", d / "device.key")
            shutil.copy(pki.ca_crt, d / "ca.crt")
            shutil.copy(pki.signing_pub, d / "signing.pub")
            write_conf(d, device_name=f"agent-{i}", switches=f"localhost:{self.server.switch}",
                       background_url=f"https://localhost:{self.server.https}/Background")
            pairs.append((f"agent-{i}", format(cert.serial_number, "x")))
        master = make_engine(dd.master_url(settings))
        store.register_devices(master, pairs)
        master.dispose()
        self.server.start()
        for i in range(self.k):
            log = open(self.work / "agents" / f"agent-{i}.log", "ab")
            self.agents.append(subprocess.Popen([PY, "-m", "quanta", "agent", str(self.work / "agents" / f"agent-{i}"),
                                                 "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))

    def ask(self) -> tuple[float, int]:
        import json

        # the ``quanta`` command as an operator types it (its console script; ``python -m quanta`` if
        # this Python has none)
        script = Path(PY).parent / "quanta"
        cmd = [str(script)] if script.exists() else [PY, "-m", "quanta"]
        dt, r = timed([*cmd, "ask", str(self.server.root), "@x = Agent.GetSummary();", "--wait", "60", "--json"],
                      timeout=120)
        try:
            states = json.loads(r.stdout)["states"]
        except (ValueError, KeyError):
            return dt, 0
        return dt, states.get("success", 0)

    def ask_api(self) -> tuple[float, int]:
        """The same question through the Consumer API from a logged-in client (no CLI start-up,
        no login): issue, then wait (long poll) until every agent has a final state."""
        from quanta.client import ConsumerClient

        if getattr(self, "api", None) is None:
            self.api = ConsumerClient.for_data_dir(self.server.root)
            self.api.status(self.api.issue("@x = Agent.GetSummary();", instruction_ttl=60)["id"])  # log in, warm up
        t0 = time.perf_counter()
        iid = self.api.issue("@x = Agent.GetSummary();", instruction_ttl=60)["id"]
        st = self.api.wait(iid, 60)
        return time.perf_counter() - t0, st["states"].get("success", 0)

    def wait_ready(self) -> None:
        import json

        def online() -> int:
            r = subprocess.run([PY, "-m", "quanta", "devices", str(self.server.root), "--json"], capture_output=True,
                               text=True)
            return sum(1 for d in json.loads(r.stdout or "[]") if d["online"]) if r.returncode == 0 else 0

        wait_until(lambda: online() >= self.k, 60 + self.k, f"{self.k} agents online")
        # as Salt's readiness pings warm its minions: one question, so that every agent has loaded
        # its SCALE evaluator and the CLI has its cached token before anything is timed
        _, n = self.ask()
        if n != self.k:
            raise TimeoutError(f"only {n} of {self.k} agents answered the warm-up question")

    @property
    def fleet(self) -> list[subprocess.Popen[bytes]]:
        return self.agents

    def stop(self) -> None:
        if getattr(self, "api", None) is not None:
            self.api.__exit__()
        for p in self.agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.server.stop()


def measure(side: SaltSide | QuantaSide, k: int, rounds: int, timed_calls: list) -> dict:  # type: ignore[type-arg]
    """Start one side's fleet, wait until all K answer, measure, stop it. Each side has the
    machine to itself: the other's idle fleet (Salt's minions keep the CPU busy for a while after
    they start) does not run meanwhile."""
    try:
        side.start()
        side.wait_ready()
        time.sleep(SETTLE)
        out: dict = {"rss": rss_per_agent(side.fleet), "idle_cpu": idle_cpu(side.fleet)}  # type: ignore[type-arg]
        out["busy"] = []
        for name, call in timed_calls:
            out[name] = []
        for _ in range(rounds):
            for name, call in timed_calls:
                # let the previous command's aftermath (returns, acks, logs) pass; note how busy
                # the machine was meanwhile (% of all cores)
                out["busy"].append(psutil.cpu_percent(interval=SETTLE))
                t, n = call()
                assert n == k, f"{name}: {n}/{k} answered"
                out[name].append(t)
        return out
    finally:
        side.stop()


def run(k: int, rounds: int, bin_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="quanta-salt-") as d:
        salt, qa = SaltSide(Path(d) / "salt", k, bin_dir), QuantaSide(Path(d) / "quanta", k)
        so = measure(salt, k, rounds, [("salt", salt.ping)])
        qo = measure(qa, k, rounds, [("quanta", qa.ask), ("api", qa.ask_api)])
    st, qt, at = so["salt"], qo["quanta"], qo["api"]
    print(f"# K={k} rounds: salt " + " ".join(f"{x:.2f}" for x in st) + "; quanta ask " +
          " ".join(f"{x:.3f}" for x in qt) + "; API " + " ".join(f"{x:.3f}" for x in at) +
          f"; idle CPU: {k} minions {so['idle_cpu']:.2f} CPU s/s, {k} agents {qo['idle_cpu']:.3f} CPU s/s"
          f"; machine busy before each command: Salt side {' '.join(f'{x:.0f}%' for x in so['busy'])}, "
          f"Quanta side {' '.join(f'{x:.0f}%' for x in qo['busy'])}",
          flush=True)
    s, q, a = statistics.median(st), statistics.median(qt), statistics.median(at)
    return {"k": k, "salt": s, "quanta": q, "ratio": s / q, "salt_rss": so["rss"], "quanta_rss": qo["rss"],
            "salt_rounds": st, "quanta_rounds": qt, "api": a, "api_ratio": s / a,
            "salt_idle": so["idle_cpu"], "quanta_idle": qo["idle_cpu"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="*", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="K = 10")
    a = ap.parse_args()
    ks = [10] if a.quick else a.k
    bin_dir = ensure_salt()
    ver = subprocess.run([str(bin_dir / "salt"), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"# {machine()}; {ver}")
    rs = [run(k, a.rounds, bin_dir) for k in ks]
    print("| K | salt '*' test.ping | quanta ask (CLI) | Salt / quanta ask | Consumer API question | Salt / API "
          "| RSS per salt-minion | RSS per quanta agent | idle CPU, K minions | idle CPU, K agents |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        print(f"| {r['k']} | {r['salt']:.2f} s | {r['quanta']:.2f} s | {r['ratio']:.1f} | {r['api']:.3f} s | "
              f"{r['api_ratio']:.1f} | "
              f"{r['salt_rss'] / 2**20:.0f} MB | {r['quanta_rss'] / 2**20:.0f} MB | "
              f"{r['salt_idle']:.2f} CPU s/s | {r['quanta_idle']:.3f} CPU s/s |")
    r = rs[-1]
    print(f"peer_salt K={r['k']} salt={r['salt']:.2f}s quanta={r['quanta']:.2f}s "
          f"api={r['api']:.3f}s api_ratio={r['api_ratio']:.1f} agent_rss={r['quanta_rss'] / 2**20:.0f}MB "
          f"minion_rss={r['salt_rss'] / 2**20:.0f}MB ratio={r['ratio']:.1f}")


if __name__ == "__main__":
    main()
