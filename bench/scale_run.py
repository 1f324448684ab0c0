"""Benchmark: SCALE compile and run time for a typical payload (processes filtered and grouped).

    python bench/scale_run.py [--quick]

The SCALE side compiles the payload and runs it over a table of process rows (the real
process list of this machine, repeated to the row count below). The baseline, measured in the
same run, inserts the same rows straight into an in-memory sqlite3 database and runs the same
query. The last line reports ratio = SCALE (compile + run) / baseline (insert + query).
The full payload, with OperatingSystem.GetProcesses collecting the data, is timed too.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quanta.scale import AgentContext, Limits, compile_scale, run_program  # noqa: E402
from quanta.scale.compiler import compile_program  # noqa: E402
from quanta.scale.evaluator import Evaluator, Table  # noqa: E402

QUERY = """SELECT UserName, Name, COUNT(*) AS Processes, SUM(MemoryBytes) AS Memory
FROM {table}
WHERE Executable LIKE {like} AND ProcessId > 1 AND Status <> {zombie}
GROUP BY UserName, Name
ORDER BY Memory DESC
LIMIT 20;"""
SCALE_SELECT = "// processes filtered and grouped\n" + QUERY.format(table="@p", like='"%/%"', zombie='"zombie"')
SCALE_FULL = "@p = OperatingSystem.GetProcesses();\n" + SCALE_SELECT
SQL = QUERY.format(table="p", like="'%/%'", zombie="'zombie'")


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rows and repetitions")
    args = ap.parse_args()
    n_rows, reps = (2_000, 5) if args.quick else (20_000, 15)

    ctx = AgentContext(data_dir=Path(tempfile.mkdtemp(prefix="quanta-bench-")))
    snap = run_program(compile_scale("OperatingSystem.GetProcesses();"), context=ctx)
    assert snap.status == "success", snap.error
    columns, base = snap.columns, snap.rows
    pid = columns.index("ProcessId")
    rows = []
    for i in range(n_rows):
        r = list(base[i % len(base)])
        r[pid] = i + 2
        rows.append(r)

    # SCALE: compile + run over the same rows.
    def scale_compile():
        return compile_program(SCALE_SELECT, None, predefined=frozenset({"p"}))

    program = scale_compile()

    def scale_run():
        res = Evaluator(program, ctx, Limits(), False, initial={"p": Table(columns, rows)}).run()
        assert res.status == "success", res.error
        return res

    def scale_total():
        prog = scale_compile()
        return Evaluator(prog, ctx, Limits(), False, initial={"p": Table(columns, rows)}).run()

    def baseline():
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE p (" + ", ".join(f'"{c}"' for c in columns) + ")")
        conn.executemany(f"INSERT INTO p VALUES ({', '.join('?' * len(columns))})", rows)
        out = conn.execute(SQL).fetchall()
        conn.close()
        return out

    assert [list(r) for r in baseline()] == scale_run().rows, "SCALE and sqlite3 disagree"

    t_compile = median_time(scale_compile, reps * 4)
    t_run = median_time(scale_run, reps)
    # interleave the two measured sides so that noise from other work hits both alike
    totals, bases = [], []
    for _ in range(reps):
        totals.append(median_time(scale_total, 1))
        bases.append(median_time(baseline, 1))
    t_total, t_base = statistics.median(totals), statistics.median(bases)
    full_prog = compile_scale(SCALE_FULL)
    t_full = median_time(lambda: run_program(full_prog, context=ctx), max(3, reps // 3))
    ratio = t_total / t_base

    print(f"rows={n_rows} processes_on_machine={len(base)} reps={reps} python={sys.version.split()[0]} sqlite={sqlite3.sqlite_version}")
    print(f"scale_compile_ms={t_compile * 1e3:.3f}")
    print(f"scale_run_ms={t_run * 1e3:.3f}")
    print(f"scale_total_ms={t_total * 1e3:.3f}")
    print(f"sqlite3_baseline_ms={t_base * 1e3:.3f}")
    print(f"full_payload_with_GetProcesses_ms={t_full * 1e3:.3f}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
