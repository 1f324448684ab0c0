"""Several Response Stacks sharing one PostgreSQL (issue 14, "scale past one machine").

A Master and two Response Stacks, each a real ``quanta server`` on its own loopback address,
data directory and ports, exported with ``quanta host export``, all on ONE PostgreSQL database;
a simulated fleet (real TLS, real certificates, protocol-true agents) on each stack's Switch.
One question through the Master's Consumer API reaches every device on both stacks and each
answer is committed once; an action approved once runs once on every device of both; a cancel
reaches both; a stack killed with SIGKILL mid-question and restarted (the other stack, then the
one the Master issues through) loses and double-counts nothing. The purge run by several stacks at once drops each ended partition once. Hostile
inputs: two stacks exported with one name or one set of ports, a stack registering with the hub
under another stack's name or with a copy of its certificate, a stack of another installation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import PG_ENV, free_port, quanta, wait_until
from quanta.client import ConsumerClient
from quanta.db import make_engine, migrate, partitions, store
from quanta.simulate import Fleet, FleetRunner, SimConfig, enroll_batch

pytestmark = pytest.mark.slow

MASTER, A, B = "127.0.0.1", "127.0.0.2", "127.0.0.3"  # three loopback addresses stand in for three hosts
PER_STACK = 150
PW = "correct horse battery staple"


@pytest.fixture
def shared_pg(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database: several Response Stacks share the Master's PostgreSQL databases
    (SQLite cannot be shared between hosts), so without QUANTA_TEST_PG_URL there is nothing to test."""
    if not os.environ.get(PG_ENV):
        if os.environ.get("CI"):
            pytest.fail(f"CI must test several Response Stacks on PostgreSQL: set {PG_ENV}")
        pytest.skip(f"several Response Stacks share one PostgreSQL database: set {PG_ENV} "
                    "(e.g. postgresql://root@127.0.0.1:5432/test) to test them")
    return request.getfixturevalue("pg_url")


def _ports(*names: str) -> list[str]:
    return [x for n in names for x in ("--port", f"{n}={free_port()}")]


class Host:
    def __init__(self, root: Path, https: int) -> None:
        self.root, self.https = root, https
        self.log = root.parent / f"{root.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "quanta", "server", str(self.root)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        """SIGKILL to the whole stack (its supervisor and every component: one process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _master(tmp_path: Path, pg: str) -> tuple[Path, int]:
    m = tmp_path / "master"
    https = free_port()
    quanta("init", str(m), "--https-port", str(https), "--switch-port", str(free_port(pair=True)),
           "--server-name", MASTER, "--database-url", pg,
           *_ports("core", "http", "hub", "coordinator", "integrate", "interaction"))
    return m, https


def _export(m: Path, out: Path, name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return quanta("host", "export", str(m), "--update-master", "--role", "response", "--server-name", name,
                  "--out", str(out), *extra, check=check)


def _stack_args() -> list[str]:
    return ["--https-port", str(free_port()), "--switch-port", str(free_port(pair=True)),
            *_ports("core", "http", "interaction")]


def _settings(root: Path) -> dict:
    import tomllib

    return tomllib.loads((root / "quanta.toml").read_text())


def _fleet(m: Path, prefix: str, out: Path, host: str, switch_port: int) -> Fleet:
    """``PER_STACK`` devices enrolled on the Master, each dialling only the given stack's Switch."""
    fleet, _ = enroll_batch(m, prefix, PER_STACK, out)
    f = out / "fleet.json"
    data = json.loads(f.read_text())
    data["switches"] = [[host, switch_port]]
    f.write_text(json.dumps(data))
    return Fleet.load(out)


def _results_rows(pg: str, iid: int) -> list[tuple[str, int]]:
    """(device, rows of it) in the shared Responses database: more than one would be a double count."""
    e = make_engine(pg)
    try:
        with e.connect() as c:
            return [tuple(r) for r in c.exec_driver_sql(
                "SELECT device_id, COUNT(*) FROM results WHERE instruction_id = %(i)s GROUP BY device_id", {"i": iid})]
    finally:
        e.dispose()


@pytest.fixture
def installation(tmp_path: Path, shared_pg: str) -> Iterator[dict]:
    m, m_https = _master(tmp_path, shared_pg)
    pw = tmp_path / "pw"
    pw.write_text(PW)
    quanta("user", "add", str(m), "--username", "bob", "--role", "Approver", "--email", "bob@example.com",
           "--password-file", str(pw))
    stacks = {}
    for name, addr in (("a", A), ("b", B)):
        _export(m, tmp_path / name, addr, *_stack_args())
        stacks[name] = tmp_path / name
    master_toml = _settings(m)
    assert master_toml["role"] == "master"
    # the first stack exported stays the Master's Core; the second follows it from the database
    assert master_toml["core_url"] == f"https://{A}:{_settings(stacks['a'])['ports']['https']}"
    hosts = {"master": Host(m, m_https), **{n: Host(r, _settings(r)["ports"]["https"]) for n, r in stacks.items()}}
    fleets: dict[str, Fleet] = {}
    runners: dict[str, FleetRunner] = {}
    try:
        for h in hosts.values():
            h.start()
        for n in ("a", "b"):
            wait_until(lambda n=n: "linked to core" in hosts[n].text(), 90, f"stack {n}'s switch linked")
            wait_until(lambda n=n: "registered with the master hub" in hosts[n].text(), 60, f"stack {n} on the hub")
            addr = A if n == "a" else B
            fleets[n] = _fleet(m, f"{n}-", tmp_path / f"fleet-{n}", addr, _settings(stacks[n])["ports"]["switch"])
            runners[n] = FleetRunner(fleets[n], SimConfig(latency="uniform:0.3:4", retry_min=0.2, retry_max=2,
                                                          seed=1 if n == "a" else 2), processes=1)
            runners[n].start()
        for n in ("a", "b"):
            wait_until(lambda n=n: runners[n].poll()["connected"] == PER_STACK, 120, f"fleet {n} connected")
        with ConsumerClient.for_data_dir(m) as api:
            wait_until(lambda: sum(d["online"] for d in api.http.get("/Consumer/Devices").json()) == 2 * PER_STACK,
                       60, "every device online on the Master")
        yield {"master": m, "pg": shared_pg, "hosts": hosts, "fleets": fleets, "runners": runners, "tmp": tmp_path}
    finally:
        for r in runners.values():
            r.stop()
        for h in hosts.values():
            h.stop()


# three real servers and two fleets, six instructions and two stacks killed and restarted: minutes
# on a loaded 2-core machine, beyond the suite's 180 s default
@pytest.mark.timeout(900)
def test_one_question_two_stacks_every_device_once(installation: dict) -> None:
    m, pg, hosts, fleets, runners = (installation[k] for k in ("master", "pg", "hosts", "fleets", "runners"))
    everyone = sorted(fleets["a"].names + fleets["b"].names)
    n = len(everyone)
    with ConsumerClient.for_data_dir(m) as api:
        # 1. one question on the Master reaches every device on both stacks; each answer once
        iid = api.issue("@x = Device.GetSummary();", instruction_ttl=60)["id"]
        status = api.wait(iid, 50)
        assert status["status"] == "finished" and status["states"] == {"success": n}, status
        assert f"instruction {iid} issued on another stack" in hosts["b"].text()
        results = api.all_results(iid)
        assert sorted(r["device"] for r in results) == everyone
        assert all(r["status"] == "success" and r["rows"][0][0] == r["device"] for r in results)
        assert {c for _, c in _results_rows(pg, iid)} == {1} and len(_results_rows(pg, iid)) == n
        assert sum(runners[x].poll()["executions"] for x in "ab") == n
        # the CLI sees them all: quanta ask (a new question) and quanta export (this one)
        asked = json.loads(quanta("ask", str(m), "@s = Device.GetSummary();", "--json", "--wait", "50").stdout)
        assert asked["states"] == {"success": n}, asked["states"]
        csv = quanta("export", str(m), str(iid), "--format", "csv").stdout.strip().splitlines()
        assert len(csv) == n + 1

        # 2. an action, approved once (by another person), runs once on every device of both stacks
        before = {x: runners[x].poll()["executions"] for x in "ab"}
        act = api.http.post("/Consumer/Instructions", json={
            "payload": 'NativeServices.RunCommand(CommandLine: "true");', "instruction_ttl": 60})
        assert act.status_code == 201 and act.json()["status"] == "pending_approval", act.text
        aid = act.json()["id"]
        with ConsumerClient.for_data_dir(m, "bob", PW, cache_token=False) as bob:
            ok = bob.http.post(f"/Consumer/Instructions/{aid}/Approve", json={"reason": "two stacks"})
            assert ok.status_code == 200, ok.text
        status = api.wait(aid, 50)
        assert status["status"] == "finished" and sum(status["states"].values()) == n, status
        assert status["states"].get("expired", 0) == 0 and status["states"].get("offline", 0) == 0, status
        wait_until(lambda: all(runners[x].poll()["executions"] == before[x] + PER_STACK for x in "ab"), 20,
                   "the action ran once per device on each stack")
        assert {c for _, c in _results_rows(pg, aid)} == {1}

        # 3. a cancel on the Master reaches both stacks: both tell their Switches, nothing is left open
        slow = api.issue("@x = Device.GetSummary();", instruction_ttl=120)["id"]
        wait_until(lambda: api.status(slow)["states"].get("success", 0) >= 10, 30, "first answers")
        r = api.http.post(f"/Consumer/Instructions/{slow}/Cancel")
        assert r.status_code in (200, 202), r.text
        wait_until(lambda: api.status(slow)["status"] == "cancelled", 20, "cancelled")
        wait_until(lambda: f"instruction {slow} cancelled on another stack" in hosts["b"].text(), 10,
                   "stack b followed the cancel")
        final = api.status(slow)["states"]
        assert set(final) <= {"success", "expired"} and sum(final.values()) == n, final
        time.sleep(1.5)  # answers still in flight are held as late, never counted after the end
        assert api.status(slow)["states"] == final

        # 4. stack b killed with SIGKILL mid-question, restarted: nothing lost, nothing twice
        q = api.issue("@x = Device.GetSummary();", instruction_ttl=90)["id"]
        wait_until(lambda: 5 <= api.status(q)["states"].get("success", 0), 30, "first answers")
        hosts["b"].kill9()
        mid = api.status(q)["states"].get("success", 0)
        assert mid < n, "the question ended before the kill: it proves nothing"
        hosts["b"].start()
        status = api.wait(q, 80)
        assert status["status"] == "finished" and status["states"] == {"success": n}, status
        assert len(_results_rows(pg, q)) == n and {c for _, c in _results_rows(pg, q)} == {1}
        assert sorted(r["device"] for r in api.all_results(q)) == everyone
        # 5. the stack the Master issues through (a) killed mid-question: the question goes on on b,
        # a comes back, its devices answer; nothing lost or doubled
        q5 = api.issue("@x = Device.GetSummary();", instruction_ttl=90)["id"]
        wait_until(lambda: f"instruction {q5} issued on another stack" in hosts["b"].text(), 20, "b follows q5")
        hosts["a"].kill9()
        assert api.status(q5)["states"].get("success", 0) < n, "the question ended before the kill"
        hosts["a"].start()
        status = api.wait(q5, 80)
        assert status["status"] == "finished" and status["states"] == {"success": n}, status
        assert len(_results_rows(pg, q5)) == n and {c for _, c in _results_rows(pg, q5)} == {1}
        # six instructions, each run at most once per device (the journal keeps a re-delivery
        # after the kill from running again); all but the cancelled one by every device
        runs = sum(runners[x].poll()["executions"] for x in "ab")
        assert 5 * n + final.get("success", 0) <= runs <= 6 * n, (runs, final)
    assert "Traceback" not in hosts["a"].text()


def test_stacks_on_one_machine_need_their_own_names_and_ports(tmp_path: Path, shared_pg: str) -> None:
    m, _ = _master(tmp_path, shared_pg)
    a_args = _stack_args()
    _export(m, tmp_path / "a", A, *a_args)
    toml_before, hosts_before = (m / "quanta.toml").read_text(), (m / "hosts.json").read_text()

    def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        for w in words:
            assert w in lines[0], lines[0]
        assert (m / "quanta.toml").read_text() == toml_before and (m / "hosts.json").read_text() == hosts_before

    # the same name again into another directory: one error, nothing written, stack a untouched
    r = _export(m, tmp_path / "a2", A, *_stack_args(), check=False)
    refused(r, "already exported", str((tmp_path / "a").resolve()))
    assert not (tmp_path / "a2").exists()
    # the same ports as stack a on the same machine (127.0.0.3 is this machine's loopback too)
    r = _export(m, tmp_path / "b", B, *a_args, check=False)
    refused(r, "on the same machine", A)
    assert not (tmp_path / "b").exists()
    # only the Core's port is the same (a careless copy of a command line): named
    core = next(x for x in a_args if x.startswith("core="))
    r = _export(m, tmp_path / "b", B, "--https-port", str(free_port()), "--switch-port", str(free_port(pair=True)),
                "--port", core, check=False)
    refused(r, core.split("=")[1], "(core)")
    # the Master's own https port
    r = _export(m, tmp_path / "b", B, "--https-port", str(_settings(m)["ports"]["https"]),
                "--switch-port", str(free_port(pair=True)), *_ports("core"), check=False)
    refused(r, "the Master", "(https)")
    # a host on another machine may use the same ports
    assert _export(m, tmp_path / "remote", "stack-b.example", *a_args).returncode == 0
    # re-exporting stack a into its own directory is not a clash with itself; --replace moves it
    assert _export(m, tmp_path / "a", A, *a_args).returncode == 0
    assert _export(m, tmp_path / "a3", A, *_stack_args(), "--replace").returncode == 0
    assert json.loads((m / "hosts.json").read_text())[A]["out"] == str((tmp_path / "a3").resolve())
    # the Master still sends to the first stack's Core
    assert _settings(m)["core_url"].startswith(f"https://{A}:")


def _hub_client(root: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "quanta", "hub-client", str(root)], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_hub_refuses_a_stack_posing_as_another(tmp_path: Path, shared_pg: str) -> None:
    m, m_https = _master(tmp_path, shared_pg)
    for name, addr in (("a", A), ("b", B)):
        _export(m, tmp_path / name, addr, *_stack_args())
    master = Host(m, m_https)
    master.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(lambda: "master hub listening" in master.text(), 60, "hub up")
        procs.append(_hub_client(tmp_path / "a", tmp_path / "a-hub.log"))
        wait_until(lambda: f"response host {A} registered" in master.text(), 30, "stack a registered")
        # b, carrying a copy of a's host certificate and key, says it is a: refused, a stays registered
        fake = tmp_path / "fake"
        shutil.copytree(tmp_path / "b", fake)
        for f in ("host.crt", "host.key"):
            shutil.copy(tmp_path / "a" / "pki" / f, fake / "pki" / f)
        toml = (fake / "quanta.toml").read_text().replace(f'server_name = "{B}"', f'server_name = "{A}"')
        (fake / "quanta.toml").write_text(toml)
        procs.append(_hub_client(fake, tmp_path / "fake-hub.log"))
        wait_until(lambda: f"host {A} is already registered" in master.text(), 30, "the copy refused")
        wait_until(lambda: "already registered" in (tmp_path / "fake-hub.log").read_text(), 30,
                   "the copy told why")
        assert master.text().count(f"response host {A} registered") == 1
        assert f"response host {A} left" not in master.text()
        # b under its own name but claiming a's name with its own certificate: refused (cert's name)
        procs[-1].kill()
        lying = tmp_path / "lying"
        shutil.copytree(tmp_path / "b", lying)
        (lying / "quanta.toml").write_text(toml)
        procs.append(_hub_client(lying, tmp_path / "lying-hub.log"))
        wait_until(lambda: f"registered as '{A}' with the host certificate of '{B}'" in master.text(), 30,
                   "name refused")
        wait_until(lambda: "the registered host must be the certificate's" in (tmp_path / "lying-hub.log").read_text(),
                   30, "the liar told why")
        # b with its own certificate and name, but another role than it was exported with: refused
        procs[-1].kill()
        role = tmp_path / "role"
        shutil.copytree(tmp_path / "b", role)
        (role / "quanta.toml").write_text((role / "quanta.toml").read_text().replace('role = "response"', 'role = "dmz"'))
        procs.append(_hub_client(role, tmp_path / "role-hub.log"))
        wait_until(lambda: f"host {B} was exported as a response host, not 'dmz'" in master.text(), 30, "role refused")
        # a stack of another installation: its certificate is not this CA's, refused at the handshake
        procs[-1].kill()
        o = tmp_path / "other-master"
        quanta("init", str(o), "--server-name", MASTER, *_ports("core", "http", "hub"))
        quanta("host", "export", str(o), "--role", "dmz", "--server-name", A, "--out", str(tmp_path / "foreign"),
               "--https-port", str(free_port()), "--switch-port", str(free_port(pair=True)),
               "--response-url", "https://127.0.0.9:1")
        foreign_toml = (tmp_path / "foreign" / "quanta.toml").read_text()
        hub = _settings(m)["ports"]["hub"]
        import re

        foreign_toml = re.sub(r'hub_url = ".*"', f'hub_url = "wss://{MASTER}:{hub}/Hub"', foreign_toml)
        (tmp_path / "foreign" / "quanta.toml").write_text(foreign_toml)
        procs.append(_hub_client(tmp_path / "foreign", tmp_path / "foreign-hub.log"))
        wait_until(lambda: "master hub link down" in (tmp_path / "foreign-hub.log").read_text(), 30,
                   "the foreign stack cannot link")
        assert master.text().count(f"host {A} registered") == 1  # only the real a, all along
    finally:
        for p in procs:
            p.kill()
        master.stop()


def test_purge_on_several_stacks_at_once_drops_each_partition_once(shared_pg: str) -> None:
    """Three Cores' purges (one engine each, as on three stacks) at the same moment over ended day
    partitions and a boundary day purged row by row: none fails, every row goes once."""
    migrate(shared_pg, "responses")
    engines = [make_engine(shared_pg) for _ in range(3)]
    now = time.time()
    today = int(now // partitions.DAY)
    e = engines[0]
    for k, day in enumerate((today - 5, today - 4, today - 3)):
        store.insert_targets(e, k + 1, {f"d{k}-{i}": True for i in range(200)}, day * partitions.DAY + 10)
    store.insert_targets(e, 9, {f"boundary-{i}": True for i in range(50)}, now - 5)
    store.insert_targets(e, 10, {"live": True}, now + 3600)
    barrier = threading.Barrier(len(engines))
    got: list[int] = []
    errors: list[BaseException] = []

    def purge(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            got.append(store.purge_expired(engine))
        except BaseException as ex:  # noqa: BLE001 - the assertion below names it
            errors.append(ex)

    threads = [threading.Thread(target=purge, args=(x,)) for x in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    while (n := store.purge_expired(e)):  # what a stack that lost the lock left: the next purge
        got.append(n)
    assert sum(got) == 3 * 200 + 50, got
    with e.connect() as c:
        tables = {r[0] for r in c.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert not {partitions.name(d) for d in (today - 5, today - 4, today - 3)} & tables
    assert store.state_counts(e, 10) == {"pending": 1}
    for x in engines:
        x.dispose()
