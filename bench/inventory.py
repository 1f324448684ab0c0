"""Benchmark: the Activity Record's capture overhead, store growth and history-question time.

    python bench/inventory.py [--quick] [--seconds N] [--capture-only]

1. Capture: a child process runs the Activity Record with its default settings (process events
   by netlink when run as root, TCP polled every 5 s, software, device performance, process
   usage) while this process makes 200 process starts per minute (``/bin/true``) and 100 TCP
   connections per minute to a local listener, each held for 2 s. Reported: the child's CPU
   (user + system) as a percentage of one core, against the same child with capture off; the
   rows captured against the starts made; the store's growth, extrapolated to a day.
2. History: a store of 30 days at that load (200 starts per minute, 40 executables, 4 users),
   written day by day and aggregated and trimmed by the store's own maintenance on a driven
   clock, as an agent would. Reported: its size, and the time of 7-day process-history questions
   through SCALE (``run_program``, limits and authorizer on), median of 5.

The last line holds ``ratio=`` = capture CPU % / the 1 % target.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quanta.agent.inventory import Store, parse_settings  # noqa: E402
from quanta.scale import AgentContext, compile_scale, run_program  # noqa: E402

WARMUP = 10.0  # seconds of load before the CPU is counted: the start and first polls are one-off

CHILD = textwrap.dedent("""
    import sys, time, os
    from pathlib import Path
    from quanta.agent.inventory import Inventory, parse_settings
    on = sys.argv[2] == "on"
    inv = None
    if on:
        inv = Inventory(Path(sys.argv[1]), parse_settings({"Module.Inventory.Enabled": "true"}))
        inv.start()
    t = os.times()
    print("ready", t.user + t.system, flush=True)
    while sys.stdin.readline().strip() == "cpu":
        t = os.times()
        print("cpu", t.user + t.system, flush=True)
    if inv is not None:
        inv.store.flush()
        st = inv.store.stats
        proc = inv.captures.get("Process")
        print("stats", st.written, st.dropped_full_queue, st.dropped_write_failed, proc.method if proc else "", flush=True)
        inv.stop()
    t = os.times()
    print("cpu", t.user + t.system, flush=True)
""")


def load(seconds: float, starts_per_min: int, conns_per_min: int,
         at: tuple[float, Callable[[], None]] | None = None) -> tuple[int, int]:
    """Process starts and held connections at the given rates; returns (starts, connections)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                c, _ = listener.accept()
                held.append(c)
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    starts = conns = 0
    t0 = time.monotonic()
    next_start = next_conn = t0
    open_: list[tuple[float, socket.socket]] = []
    while time.monotonic() - t0 < seconds:
        now = time.monotonic()
        if at is not None and now - t0 >= at[0]:
            at[1]()
            at = None
        if now >= next_start:
            subprocess.run(["/bin/true"])
            starts += 1
            next_start += 60 / starts_per_min
        if now >= next_conn:
            open_.append((now, socket.create_connection(("127.0.0.1", port))))
            conns += 1
            next_conn += 60 / conns_per_min
        for item in [x for x in open_ if now - x[0] >= 2]:
            item[1].close()
            open_.remove(item)
        time.sleep(max(0.0, min(next_start, next_conn) - time.monotonic()))
    stop.set()
    for _, s in open_:
        s.close()
    for c in held:
        c.close()
    listener.close()
    return starts, conns


def capture(seconds: float, on: bool) -> dict[str, object]:
    d = Path(tempfile.mkdtemp(prefix="quanta-bench-inv-"))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(d), "on" if on else "off"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert child.stdout is not None and child.stdin is not None
    ready = child.stdout.readline().split()
    assert ready[0] == "ready", ready
    cpu0 = float(ready[1])
    mark: list[float] = []

    def cpu_now() -> None:  # the child's CPU after the warm-up (its start, the first polls)
        child.stdin.write("cpu\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        mark.extend([float(child.stdout.readline().split()[1]), time.monotonic()])  # type: ignore[union-attr]

    t0 = time.monotonic()
    starts, conns = load(seconds, 200, 100, (WARMUP, cpu_now))
    child.stdin.write("cpu\n")
    child.stdin.flush()
    cpu_end, t_end = float(child.stdout.readline().split()[1]), time.monotonic()
    wall = t_end - t0
    child.stdin.write("stop\n")
    child.stdin.flush()
    out: dict[str, object] = {"starts": starts, "connections": conns, "wall": wall}
    for line in child.stdout:
        parts = line.split()
        if parts[0] == "stats":
            out["written"], out["method"] = int(parts[1]), parts[4] if len(parts) > 4 else ""
    child.wait(30)
    out["warmup_cpu"] = mark[0] - cpu0
    out["cpu_pct"] = 100 * (cpu_end - mark[0]) / (t_end - mark[1])
    db = d / "inventory.db"
    if db.exists():
        c = sqlite3.connect(db)
        out["process_rows"] = c.execute("SELECT count(*) FROM Process_Live WHERE ExecutableName = 'true'").fetchone()[0]
        out["unnamed_rows"] = c.execute("SELECT count(*) FROM Process_Live WHERE ExecutablePath = ''").fetchone()[0]
        out["unnamed_with_parent"] = c.execute("SELECT count(*) FROM Process_Live WHERE ExecutablePath = '' "
                                               "AND ParentProcessId IS NOT NULL").fetchone()[0]
        out["tcp_rows"] = c.execute("SELECT count(*) FROM TCP_Live").fetchone()[0]
        out["software_rows"] = c.execute("SELECT count(*) FROM Software_Live").fetchone()[0]
        out["perf_rows"] = sum(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                               for t in ("DevicePerformance_Live", "ProcessUsage_Live"))
        out["rows_per_day"] = (out["process_rows"] + out["tcp_rows"] + out["perf_rows"]) / wall * 86400
        c.close()
    return out


def history(days: int, per_min: int) -> dict[str, object]:
    d = Path(tempfile.mkdtemp(prefix="quanta-bench-inv-hist-"))
    day0 = (int(time.time()) // 86400 - days) * 86400
    clock = [float(day0)]
    store = Store(d / "inventory.db", parse_settings({"Module.Inventory.MaintenanceIntervalSeconds": "86400"}),
                  lambda: clock[0])
    store.start()
    store.flush()  # created
    rnd = random.Random(13)
    exes = [f"tool{i:02d}" for i in range(39)] + ["psexec"]
    users = ["root", "alice", "bob", "svc"]
    per_day = per_min * 1440
    conns_per_day = 100 * 1440
    sizes: list[int] = []
    t_write = time.perf_counter()
    for day in range(days):
        def insert(conn: sqlite3.Connection, day: int = day) -> None:
            rows = []
            for i in range(per_day):
                ts = day0 + day * 86400 + i * 86400 // per_day
                exe = exes[rnd.randrange(len(exes))] if rnd.random() < 0.999 else "psexec"
                rows.append((ts, 10_000 + i, 1, exe, f"/usr/bin/{exe}", f"{exe} --run {i % 97}",
                             users[i % len(users)], "%064x" % (hash(exe) & (2**256 - 1)), ts + 1, "netlink"))
            tcp = []
            for i in range(conns_per_day):
                ts = day0 + day * 86400 + i * 86400 // conns_per_day
                exe = exes[i % 7]
                tcp.append((ts, ts + 2, 20_000 + i % 5000, exe, f"/usr/bin/{exe}", "10.0.0.5", 30_000 + i % 30_000,
                            f"203.0.113.{i % 50}", 443, "Outbound", "poll"))
            conn.execute("BEGIN")
            conn.executemany('INSERT INTO "Process_Live" VALUES (?,?,?,?,?,?,?,?,?,?)', rows)
            conn.executemany('INSERT INTO "TCP_Live" VALUES (?,?,?,?,?,?,?,?,?,?,?)', tcp)
            conn.execute("COMMIT")
        store.call(insert, timeout=600)
        clock[0] = day0 + (day + 1) * 86400 + 600
        store.maintain(timeout=600)
        sizes.append(store.call(Store.used_bytes))
    write_s = time.perf_counter() - t_write
    size = os.path.getsize(d / "inventory.db")
    now = clock[0]
    ctx = AgentContext(data_dir=d)
    questions = {
        "psexec in the last 7 days (hourly)":
            f"SELECT ExecutableName, UserName, SUM(ExecutionCount) AS Runs FROM $Process_Hourly "
            f"WHERE ExecutableName = \"psexec\" AND Ts >= {int(now) - 7 * 86400} GROUP BY 1, 2;",
        "top 10 executables, 7 days (daily)":
            f"SELECT ExecutableName, SUM(ExecutionCount) AS Runs FROM $Process_Daily "
            f"WHERE Ts >= {int(now) - 7 * 86400} GROUP BY 1 ORDER BY 2 DESC LIMIT 10;",
        "psexec starts with command lines (live, as far as kept)":
            f"SELECT Ts, ProcessId, CommandLine, UserName FROM $Process_Live "
            f"WHERE ExecutableName = \"psexec\" AND Ts >= {int(now) - 7 * 86400};",
    }
    times = {}
    for label, q in questions.items():
        prog = compile_scale(q)
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            r = run_program(prog, context=ctx)
            samples.append(time.perf_counter() - t)
            assert r.status in ("success", "nocontent"), r.error
        times[label] = (statistics.median(samples) * 1000, len(r.rows))
    c = sqlite3.connect(d / "inventory.db")
    counts = {t: c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
              for t in ("Process_Live", "Process_Hourly", "Process_Daily", "Process_Monthly", "TCP_Live",
                        "TCP_Hourly")}
    c.close()
    store.stop()
    last = sizes[-4:]
    growth = (last[-1] - last[0]) / max(len(last) - 1, 1)
    return {"size": size, "write_s": write_s, "times": times, "counts": counts, "first_day": sizes[0],
            "growth": growth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 s of load, a 5-day store")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--capture-only", action="store_true", help="only the capture overhead (no history store)")
    args = ap.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 120.0)
    days = 5 if args.quick else 30
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, euid {os.geteuid()}")
    off = capture(seconds, on=False)
    on = capture(seconds, on=True)
    extra = float(on["cpu_pct"]) - float(off["cpu_pct"])  # type: ignore[arg-type]
    print(f"capture: {seconds:.0f} s, {on['starts']} starts ({on['starts'] / seconds * 60:.0f}/min), "
          f"{on['connections']} connections ({on['connections'] / seconds * 60:.0f}/min)")
    print(f"  process rows of the starts: {on.get('process_rows')} / {on['starts']} named (by {on.get('method')}), "
          f"{on.get('unnamed_rows')} more of processes gone before /proc was read ({on.get('unnamed_with_parent')} of "
          f"them with their parent, from the fork event); TCP rows: {on.get('tcp_rows')}")
    print(f"  child CPU after {WARMUP:.0f} s of warm-up: capture on {on['cpu_pct']:.2f} % of one core, "
          f"off {off['cpu_pct']:.2f} %, capture costs {extra:.2f} %; start and warm-up took "
          f"{float(on['warmup_cpu']):.2f} s of CPU once (the software's present set, first polls)")
    print(f"  rows captured at this load: {float(on.get('rows_per_day', 0)):,.0f} per day "
          "(software's one-off present set not counted)")
    if args.capture_only:
        print(f"capture_cpu_pct={extra:.2f} ratio={extra / 1.0:.2f}")
        return
    h = history(days, 200)
    print(f"history: {days}-day store at 200 starts/min written and maintained in {h['write_s']:.0f} s: "
          f"{h['size'] / 1e6:.1f} MB, rows {h['counts']}")
    print(f"  store growth: {h['first_day'] / 1e6:.1f} MB on the first day (live rows until their row caps), "
          f"{h['growth'] / 1e6:.2f} MB/day over the last days at the default retention")
    for label, (ms, n) in h["times"].items():
        print(f"  {label}: {ms:.1f} ms ({n} rows)")
    worst = max(ms for ms, _ in h["times"].values())
    print(f"capture_cpu_pct={extra:.2f} history_worst_ms={worst:.1f} ratio={extra / 1.0:.2f}")


if __name__ == "__main__":
    main()
