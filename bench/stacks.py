"""Several Response Stacks on one PostgreSQL (issue 14): Core ingest per second per stack with one
stack writing alone and with two (or ``--stacks`` N) writing to the shared database at once, and
the database's size per million answers.

    python bench/stacks.py [--n 50000] [--batch 2000] [--rounds 3] [--stacks 2] [--database-url postgresql://...]

Each "stack" is its own process running the Core of a Response Stack (``quanta.core.stacks.StackCore``)
on the Core's own path for what a Switch sends, as ``bench/ingest.py`` does: N target rows
inserted as ``issue`` does, then N answers (one row of 3 columns, 32 bytes of payload, as
``quanta simulate`` sends by default) in ``ResponseBatch`` frames of ``--batch`` answers, decoded,
committed (COPY into a temporary table and one ``UPDATE ... FROM``) and acknowledged until the
instruction finishes (``ingest.quanta_once``). Every stack has its own instruction, so the rows are
distinct. No ``ANALYZE`` is run by the bench: writing the targets analyses a day partition whose
statistics know fewer rows than were written (``partitions.analyze_if_unknown``; before it, a
fresh database's batch UPDATE took 19 s a batch, see docs/benchmarks.md). Rounds are
interleaved (alone, together, alone, together, ...) and the medians are reported.

Size: after the rounds, ``pg_total_relation_size`` of every partition of ``results`` (heap, TOAST,
primary key and indexes) over the number of answered rows in it, times a million.

A scratch database (``stacks_bench_<random>``) is made on the server of ``--database-url`` or
``QUANTA_TEST_PG_URL`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402,F401  (puts src/ on the path)

from _harness import machine  # noqa: E402
from ingest import pg_database, quanta_once  # noqa: E402


async def one_stack(url: str, n: int, size: int, iid: int) -> float:
    from quanta.core.stacks import StackCore

    return await quanta_once(url, url, n, size, iid, StackCore)


def _worker(url: str, n: int, size: int, iid: int, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    start.wait()
    out.put((iid, asyncio.run(one_stack(url, n, size, iid))))


def run_round(url: str, n: int, size: int, iids: list[int]) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(iids)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, n, size, iid, start, out)) for iid in iids]
    for p in procs:
        p.start()
    got = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p.exitcode
    return [n / dt for _, dt in got]


def size_per_million(url: str) -> tuple[int, int]:
    from quanta.db import make_engine

    e = make_engine(url)
    with e.connect() as c:
        total = int(c.exec_driver_sql(
            "SELECT COALESCE(SUM(pg_total_relation_size(relid)), 0) FROM pg_partition_tree('results')").scalar_one())
        rows = int(c.exec_driver_sql("SELECT count(*) FROM results WHERE state = 'success'").scalar_one())
    e.dispose()
    return total, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stacks", type=int, default=2)
    ap.add_argument("--database-url", default=os.environ.get("QUANTA_TEST_PG_URL"))
    a = ap.parse_args()
    if not a.database_url:
        sys.exit("needs PostgreSQL: --database-url or QUANTA_TEST_PG_URL")
    from quanta.db import migrate

    print(f"# {machine()}; load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    alone: list[float] = []
    together: list[float] = []
    with pg_database(a.database_url, "stacks_bench_") as url:
        migrate(url, "master")
        migrate(url, "responses")
        iid = 1
        for r in range(a.rounds):
            rate = run_round(url, a.n, a.batch, [iid])
            iid += 1
            alone += rate
            rates = run_round(url, a.n, a.batch, list(range(iid, iid + a.stacks)))
            iid += a.stacks
            together += rates
            print(f"round {r + 1}: alone {rate[0]:,.0f}/s; {a.stacks} at once "
                  f"{', '.join(f'{x:,.0f}' for x in rates)}/s per stack (sum {sum(rates):,.0f}/s); "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        size, rows = size_per_million(url)
    ma, mt = statistics.median(alone), statistics.median(together)
    print(f"median per stack: alone {ma:,.0f} answers/s, {a.stacks} at once {mt:,.0f} answers/s each "
          f"({mt / ma:.2f}x alone; together {a.stacks * mt:,.0f}/s)")
    print(f"database size: {size / 1e6:,.1f} MB for {rows:,} answers = {size / rows * 1e6 / 2**30:,.2f} GiB "
          f"per million answers ({size / rows:,.0f} bytes per answer)")
    print(f"ratio={mt / ma:.2f}")


if __name__ == "__main__":
    main()
