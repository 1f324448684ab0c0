"""The Activity Record's store: batches, file modes, aggregation on a driven clock (with catch-up
after a downtime), retention, the size cap, a full queue, a corrupt file and a kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from quanta.agent.inventory import Store, parse_settings
from quanta.agent.inventory.settings import InventoryConfigError
from quanta.scale import AgentContext, compile_scale, run_program
from quanta.scale.tables import SOURCES, ddl, table_names

DAY = 86400
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings(**kw: str):  # type: ignore[no-untyped-def]
    values = {"Module.Inventory.Enabled": "true", "Module.Inventory.FlushIntervalSeconds": "0.05",
              "Module.Inventory.MaintenanceIntervalSeconds": "86400"}
    values.update({f"Module.Inventory.{k}": v for k, v in kw.items()})
    return parse_settings(values)


def proc_row(ts: int, name: str = "sleep", pid: int = 1) -> dict[str, object]:
    return {"TS": ts, "ProcessId": pid, "ParentProcessId": 1, "ExecutableName": name,
            "ExecutablePath": f"/usr/bin/{name}", "CommandLine": name, "UserName": "root",
            "ExecutableHash": "ab" * 32, "CaptureMethod": "poll"}


@pytest.fixture()
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = Clock(T0)
    s = Store(tmp_path / "inventory.db", settings(), clock)
    s.start()
    yield s
    s.stop()


def ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_rows_are_written_in_batches_to_0600_files(store: Store) -> None:
    for i in range(50):
        assert store.put("Process_Live", proc_row(T0 + i, pid=i))
    store.flush()
    assert store.stats.written == 50 and store.stats.batches <= 2
    with ro(store.path) as c:
        assert c.execute("SELECT count(*) FROM Process_Live").fetchone()[0] == 50
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for suffix in ("", "-wal", "-shm"):
        mode = stat.S_IMODE(os.stat(str(store.path) + suffix).st_mode)
        assert mode == 0o600, (suffix, oct(mode))
    # every declared table exists with its declared columns
    with ro(store.path) as c:
        for src in SOURCES:
            for g in ("Live", "Hourly", "Daily", "Monthly"):
                cols = [r[1] for r in c.execute(f'PRAGMA table_info("{src.table(g)}")')]
                assert cols == [col.name for col in src.columns(g)]


def test_hostile_values_are_stored_as_text_and_never_break_a_batch(store: Store) -> None:
    weird = {**proc_row(T0, pid=7), "CommandLine": "a\x00b\udcff\n'; DROP TABLE Process_Live; --",
             "ExecutableName": b"\xff\xfe", "ProcessId": 2**70, "ParentProcessId": object()}
    assert store.put("Process_Live", weird)
    assert store.put("Process_Live", proc_row(T0 + 1, pid=8))
    store.flush()
    with ro(store.path) as c:
        rows = c.execute("SELECT ProcessId, CommandLine FROM Process_Live ORDER BY Ts").fetchall()
    assert len(rows) == 2 and rows[1][0] == 8
    assert rows[0][0] == float(2**70) and "DROP TABLE" in rows[0][1] and "\x00" not in rows[0][1]


def test_aggregation_follows_the_clock_and_catches_up_after_a_downtime(store: Store) -> None:
    # three days of starts: 2 per hour of "sleep", 1 per hour of "bash"
    for h in range(72):
        for k in range(2):
            store.put("Process_Live", proc_row(T0 + h * 3600 + k * 60, "sleep", pid=h * 10 + k))
        store.put("Process_Live", proc_row(T0 + h * 3600 + 30, "bash", pid=h * 10 + 5))
    store.flush()
    # on the first day at 10:30 only the hours up to 10:00 (less the grace) are complete
    store.maintain(now=T0 + 10 * 3600 + 1800)
    with ro(store.path) as c:
        assert c.execute("SELECT count(*), sum(ExecutionCount) FROM Process_Hourly").fetchone() == (20, 30)
        assert c.execute("SELECT count(*) FROM Process_Daily").fetchone()[0] == 0
    # the device was off for weeks: one run catches up every hour and day
    store.maintain(now=T0 + 20 * DAY)
    store.maintain(now=T0 + 20 * DAY)  # running again adds nothing
    with ro(store.path) as c:
        assert c.execute("SELECT sum(ExecutionCount) FROM Process_Hourly").fetchone()[0] == 72 * 3
        assert c.execute("SELECT count(*) FROM Process_Monthly").fetchone()[0] == 0  # January is not over
    # and then the month; the hourly rows are past their 31 days by now
    store.maintain(now=T0 + 40 * DAY)
    with ro(store.path) as c:
        assert c.execute("SELECT count(*) FROM Process_Hourly").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM Process_Live").fetchone()[0] == 0  # 7 days
        daily = c.execute("SELECT Ts, ExecutableName, ExecutionCount FROM Process_Daily ORDER BY Ts, 2").fetchall()
        assert daily == [(T0 + d * DAY, n, c_) for d in range(3) for n, c_ in (("bash", 24), ("sleep", 48))]
        monthly = c.execute("SELECT Ts, ExecutableName, ExecutionCount FROM Process_Monthly ORDER BY 2").fetchall()
        assert monthly == [(T0, "bash", 72), (T0, "sleep", 144)]


def test_retention_by_age_and_by_rows(tmp_path: Path) -> None:
    clock = Clock(T0 + 10 * DAY)
    s = Store(tmp_path / "inventory.db", settings(**{"Process.Live.MaxAgeDays": "2", "TCP.Live.MaxRows": "5"}), clock)
    s.start()
    try:
        for d in range(10):
            s.put("Process_Live", proc_row(T0 + d * DAY + 5, pid=d))
        for i in range(12):
            s.put("TCP_Live", {"TS": T0 + 9 * DAY + i, "Port": i, "LocalPort": 1, "IpAddress": "1.2.3.4",
                               "LocalAddress": "127.0.0.1"})
        s.flush()
        s.maintain()
        with ro(s.path) as c:
            assert [r[0] for r in c.execute("SELECT ProcessId FROM Process_Live ORDER BY Ts")] == [8, 9]
            assert [r[0] for r in c.execute("SELECT Port FROM TCP_Live ORDER BY Ts")] == [7, 8, 9, 10, 11]
    finally:
        s.stop()


def test_a_store_at_its_size_cap_drops_the_oldest_rows_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "inventory.db", settings(MaxSizeMB="1", QueueRows="100000", BatchRows="500"), Clock(T0))
    s.start()
    try:
        n = 12_000  # about 3 MB of rows against a 1 MB cap
        for i in range(n):
            assert s.put("Process_Live", {**proc_row(T0 + i, pid=i), "CommandLine": "x" * 200})
        s.flush()
        assert s.stats.trimmed_for_size > 0 and s.stats.dropped_write_failed == 0
        c = ro(s.path)
        lo, hi, count = c.execute("SELECT min(Ts), max(Ts), count(*) FROM Process_Live").fetchone()
        used = (c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]) \
            * c.execute("PRAGMA page_size").fetchone()[0]
        c.close()
        assert hi == T0 + n - 1, "the newest row was dropped"
        assert lo > T0 and count == hi - lo + 1, "not the oldest rows were dropped"
        assert used <= 1024 * 1024
        assert os.path.getsize(s.path) <= 1.5 * 1024 * 1024  # the file shrinks too (auto_vacuum=FULL)
    finally:
        s.stop()


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    s = Store(tmp_path / "inventory.db", settings(QueueRows="100"), Clock(T0))  # writer not started: stalled
    t = time.monotonic()
    results = [s.put("Process_Live", proc_row(T0 + i, pid=i)) for i in range(1000)]
    assert time.monotonic() - t < 1.0
    assert results.count(True) == 100 and s.stats.dropped_full_queue == 900
    s.start()
    s.flush()
    s.stop()
    with ro(s.path) as c:
        assert c.execute("SELECT count(*) FROM Process_Live").fetchone()[0] == 100


def test_a_corrupt_store_is_set_aside_and_questions_say_so(tmp_path: Path) -> None:
    db = tmp_path / "inventory.db"
    db.write_bytes(b"this is not a database" * 1000)
    ctx = AgentContext(data_dir=tmp_path)
    r = run_program(compile_scale("SELECT * FROM $Process_Live;"), context=ctx)
    assert r.status == "error" and "Activity Record unavailable" in str(r.error) and "$Process_Live" in str(r.error)
    # a question that does not read the store is not affected
    assert run_program(compile_scale("@x = Agent.GetSummary();"), context=ctx).status == "success"
    s = Store(db, settings(), Clock(T0))
    s.start()
    try:
        s.put("Process_Live", proc_row(T0, pid=42))
        s.flush()
    finally:
        s.stop()
    assert list(tmp_path.glob("inventory.db.corrupt-*")), "the corrupt file was not kept aside"
    r = run_program(compile_scale("SELECT ProcessId FROM $Process_Live;"), context=ctx)
    assert r.status == "success" and r.rows == [[42]]


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    r = run_program(compile_scale("SELECT * FROM $TCP_Daily;"), context=AgentContext(data_dir=tmp_path))
    assert r.status == "error" and "Module.Inventory.Enabled=true" in str(r.error)
    assert not (tmp_path / "inventory.db").exists(), "a read created the store"


def test_a_locked_store_keeps_questions_answering(tmp_path: Path) -> None:
    s = Store(tmp_path / "inventory.db", settings(), Clock(T0))
    s.start()
    s.put("Process_Live", proc_row(T0, pid=5))
    s.flush()
    # another program holds a write lock: WAL readers still read the committed rows
    other = sqlite3.connect(tmp_path / "inventory.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        r = run_program(compile_scale("SELECT ProcessId FROM $Process_Live;"), context=AgentContext(data_dir=tmp_path))
        assert r.status == "success" and r.rows == [[5]]
        s.put("Process_Live", proc_row(T0 + 1, pid=6))  # this batch cannot be written (busy): dropped, counted
        deadline = time.monotonic() + 20
        while s.stats.dropped_write_failed == 0 and time.monotonic() < deadline:
            s.flush()
        assert s.stats.dropped_write_failed == 1 and "locked" in s.stats.errors[-1]
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.put("Process_Live", proc_row(T0 + 2, pid=7))
    s.flush()
    s.stop()
    with ro(tmp_path / "inventory.db") as c:
        assert [r[0] for r in c.execute("SELECT ProcessId FROM Process_Live ORDER BY Ts")] == [5, 7]


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quanta.agent.inventory import Store, parse_settings
    s = Store(Path(sys.argv[1]), parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05",
                                                 "Module.Inventory.BatchRows": "200"}))
    s.start()
    i = 0
    while True:
        s.put("Process_Live", {"TS": int(time.time()), "ProcessId": i, "CommandLine": "x" * 100})
        i += 1
        if i % 200 == 0:
            s.flush()
            print(i, flush=True)  # rows 0..i-1 are committed
""")


def test_kill_9_while_writing_loses_at_most_one_batch_and_never_corrupts(tmp_path: Path) -> None:
    db = tmp_path / "inventory.db"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        assert p.stdout is not None
        for line in p.stdout:
            committed = int(line)
            if committed >= 4000:
                break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait(10)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n, top = c.execute("SELECT count(*), max(ProcessId) FROM Process_Live").fetchone()
    assert n == top + 1, "rows are missing inside what was committed"
    assert top + 1 >= committed, "a committed batch was lost"
    assert top + 1 - committed <= 200 + 200, "more than the batch being written was in flight"
    # and the store reopens for more
    s = Store(db, settings(), Clock(T0))
    s.start()
    s.put("Process_Live", proc_row(T0, pid=-1))
    s.flush()
    s.stop()
    assert s.stats.written == 1 and not list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.parametrize("values,message", [
    ({"Module.Inventory.Enabled": "maybe"}, "is not true or false"),
    ({"Module.Inventory.MaxSizeMB": "-1"}, "must be between"),
    ({"Module.Inventory.MaxSizeMB": "nan"}, "must be between"),
    ({"Module.Inventory.TCP.PollIntervalSeconds": "0"}, "must be between"),
    ({"Module.Inventory.Process.Method": "ebpf"}, "is not one of"),
    ({"Module.Inventory.Process.Live.MaxRows": "1e99"}, "must be between"),
])
def test_bad_settings_are_refused_with_their_key(values: dict[str, str], message: str) -> None:
    with pytest.raises(InventoryConfigError, match=message) as e:
        parse_settings(values)
    assert list(values)[0] in str(e.value)


def test_settings_are_case_insensitive_and_unknown_keys_are_reported() -> None:
    s = parse_settings({"module.inventory.enabled": "TRUE", "Module.Inventory.tcp.enabled": "false",
                        "Module.Inventory.Process.Hourly.MaxAgeDays": "3", "Module.Inventory.Bogus": "1",
                        "Switch": "x"})
    assert s.enabled and not s.source("TCP").enabled and s.source("Process").retention["Hourly"][0] == 3
    assert s.warnings == ["unknown setting Module.Inventory.Bogus ignored"]
    assert parse_settings({}).enabled is False  # off unless enabled


def test_one_declaration_names_every_table() -> None:
    names = table_names()
    assert "Process_Live" in names and "TCP_Daily" in names and "DevicePerformance_Monthly" in names
    assert len(names) == len(SOURCES) * 4
    conn = sqlite3.connect(":memory:")
    for stmt in ddl():
        conn.execute(stmt)
    assert threading.current_thread() is threading.main_thread()


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="mounts a small tmpfs")
def test_a_full_disk_drops_a_batch_then_makes_room_and_never_corrupts(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    try:
        s = Store(disk / "inventory.db", settings(QueueRows="100000", BatchRows="200", MaxSizeMB="10"), Clock(T0))
        s.start()
        try:
            i = 0
            deadline = time.monotonic() + 60
            while s.stats.dropped_write_failed == 0 and time.monotonic() < deadline:
                for _ in range(200):
                    s.put("Process_Live", {**proc_row(T0 + i, pid=i), "CommandLine": "y" * 300})
                    i += 1
                s.flush()
            assert s.stats.dropped_write_failed > 0 and any("full" in e for e in s.stats.errors), s.stats
            failed_before = s.stats.dropped_write_failed
            for _ in range(5):  # and then it goes on: the oldest rows made room
                for _ in range(200):
                    s.put("Process_Live", {**proc_row(T0 + i, pid=i), "CommandLine": "y" * 300})
                    i += 1
                s.flush()
            assert s.stats.dropped_write_failed - failed_before <= 400, s.stats
        finally:
            s.stop()
        c = sqlite3.connect(disk / "inventory.db")
        try:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            lo, hi = c.execute("SELECT min(ProcessId), max(ProcessId) FROM Process_Live").fetchone()
        finally:
            c.close()
        assert hi == i - 1 and lo > 0, (lo, hi, i)  # the newest rows are there, the oldest went
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_store_of_an_earlier_version_gets_the_columns_declared_since(tmp_path: Path) -> None:
    """Software_Live as the previous version made it (no IsUninstall, its time column Ts): the store
    adds the column and renames Ts to TS when it opens, keeps the old rows (NULL there), writes new
    rows with it, and SCALE reads it."""
    db = tmp_path / "inventory.db"
    c = sqlite3.connect(db)
    c.execute('CREATE TABLE "Software_Live" ("Ts" INTEGER, "Product" TEXT, "Version" TEXT, "Publisher" TEXT, '
              '"Architecture" TEXT, "Operation" TEXT, "PreviousVersion" TEXT, "PackageManager" TEXT)')
    c.execute("INSERT INTO Software_Live VALUES (?, 'old', '1', '', 'all', 'Present', '', 'dpkg')", (T0 - 60,))
    c.commit()
    c.close()
    s = Store(db, settings(), Clock(T0))
    s.start()
    s.put("Software_Live", {"TS": T0, "Product": "telnet", "Version": "2", "IsUninstall": 1, "Operation": "Uninstall"})
    s.flush()
    s.stop()
    with ro(db) as c:
        assert c.execute("SELECT Product, IsUninstall FROM Software_Live ORDER BY Ts").fetchall() == [
            ("old", None), ("telnet", 1)]
        # the time column took the declared casing, so SELECT * answers TS on every device
        assert [r[1] for r in c.execute('PRAGMA table_info("Software_Live")')][:2] == ["TS", "Product"]
    from quanta.scale import AgentContext, compile_scale, run_program

    # the model's instructions write the time column TS; SQLite's names are case-insensitive
    r = run_program(compile_scale(f"SELECT TS, Product FROM $Software_Live WHERE IsUninstall = 1 AND TS >= {T0};"),
                    context=AgentContext(data_dir=tmp_path))
    assert r.status == "success" and r.columns == ["TS", "Product"] and r.rows == [[T0, "telnet"]], r
