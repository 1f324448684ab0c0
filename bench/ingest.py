"""Responses per second committed by the Core, on SQLite and on PostgreSQL.

    python bench/ingest.py [--n 50000] [--batch 2000] [--database-url postgresql://...] [--quick]
                           [--retained 10000000] [--skip-sqlite]

The Quanta side is the Core's own path for what a Switch sends: decode each ``ResponseBatch``
(msgpack, as it arrives on the link), ``Core.ingest`` (idempotent UPDATE of the open
(instruction, device) rows on the Core's writer thread, commit, BatchAck, the "everyone
answered?" count) until the instruction finishes. N target rows are inserted first, as
``issue`` does. On PostgreSQL the answers go through COPY into a temporary table and one
``UPDATE ... FROM`` (``store.ingest_counted``), into the partitioned ``results``.

The baseline, in the same run and the same database: a bare DBAPI ``executemany`` INSERT of the
same rows (JSON-encoded columns and rows, same batches, one commit per batch) into a plain table.
Both run ``--repeat`` times, interleaved; medians are compared. PostgreSQL is used when
``--database-url`` or ``QUANTA_TEST_PG_URL`` names a server (a scratch database is created and
dropped). ``--retained M`` (PostgreSQL): M answered rows of earlier instructions (50,000 devices
each, expiring over the next 7 days, so in 7 partitions) are in ``results`` before anything is
measured, written by ``generate_series`` in the server; then the results-page queries
(``store.page_result_rows``, first and last page, and ``store.state_counts``) are timed on the
big store (``--compare-unpartitioned``: and on the same rows in the table before responses_0004,
in a second scratch database), and the purge: whole days dropped, then a day row by row. ``--quick``: N = 1,000. The last line holds ``ratio=`` = Quanta rate / bare rate, the
lower of the databases measured (target ≥ 0.5; on PostgreSQL with 10 M retained, ≥ 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402,F401  (puts src/ on the path)

from _harness import machine  # noqa: E402

COLUMNS = ["Device", "Row", "Data"]


def batches(n: int, size: int, iid: int) -> list[bytes]:
    from quanta import protocol as p

    out = []
    for b, lo in enumerate(range(0, n, size)):
        rs = [p.DeviceResponse(device_id=f"sim-{i:06d}", response=p.Response(
            instruction_id=iid, status="success", columns=COLUMNS, rows=[[f"sim-{i:06d}", 0, "x" * 32]]))
            for i in range(lo, min(n, lo + size))]
        out.append(p.encode(p.ResponseBatch(batch_id=b + 1, responses=rs)))
    return out


async def quanta_once(master_url: str, responses_url: str, n: int, size: int, iid: int,
                      core_class: type | None = None) -> float:
    """The Core's own path for ``n`` answers to instruction ``iid`` (``core_class``: the Core, or a
    subclass such as a Response Stack's ``StackCore``); seconds from the first batch to the last."""
    from quanta import protocol as p
    from quanta.core.service import Core, SwitchLink
    from quanta.db import make_engine, store

    master, responses = make_engine(master_url), make_engine(responses_url)
    store.insert_targets(responses, iid, {f"sim-{i:06d}": True for i in range(n)}, time.time() + 3600)
    store.mark_sent(responses, iid, [f"sim-{i:06d}" for i in range(n)])
    core = (core_class or Core)(master, responses, b"s" * 32, expiry_interval=3600, purge_interval=3600)
    acks = []

    async def send(data: bytes) -> None:
        acks.append(data)

    # every simulated device said hello through this link (the Core holds answers from strangers)
    link = SwitchLink(f"bench-{iid}", "localhost", 1, "x", send, {f"sim-{i:06d}" for i in range(n)})
    core.ledger.open(p.WorkItem(instruction=p.SignedInstruction(body=b"", signature=b""), id=iid,
                                expires_at=time.time() + 3600, devices=None), n)
    frames = batches(n, size, iid)
    t0 = time.perf_counter()
    for f in frames:
        await core.handle(link, p.decode_from_switch(f))
    dt = time.perf_counter() - t0
    assert iid not in core.active, "instruction did not finish"
    assert store.state_counts(responses, iid) == {"success": n}
    await core.stop()
    master.dispose()
    responses.dispose()
    return dt


def bare_once(url: str, n: int, size: int, table: str) -> float:
    from quanta import protocol as p
    from quanta.db import is_sqlite

    frames = batches(n, size, 1)
    if is_sqlite(url):
        import sqlite3

        conn = sqlite3.connect(url.split("///", 1)[1])
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        ph = "?"
    else:
        import psycopg

        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        ph = "%s"
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {table}")
    cur.execute(f"CREATE TABLE {table} (instruction_id INTEGER, device_id VARCHAR(255), state VARCHAR(16), "
                f"columns TEXT, rows TEXT, error TEXT, updated_at FLOAT, PRIMARY KEY (instruction_id, device_id))")
    conn.commit()
    sql = f"INSERT INTO {table} VALUES ({', '.join([ph] * 7)})"
    t0 = time.perf_counter()
    for f in frames:
        b = p.decode_from_switch(f)
        now = time.time()
        cur.executemany(sql, [(r.response.instruction_id, r.device_id, r.response.status,
                               json.dumps(r.response.columns), json.dumps(r.response.rows), r.response.error, now)
                              for r in b.responses])
        conn.commit()
    dt = time.perf_counter() - t0
    cur.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    return dt


def pg_database(server_url: str, prefix: str = "quanta_bench_"):  # type: ignore[no-untyped-def]
    """A scratch database (``prefix`` + random) on ``server_url`` for the run, dropped after it."""
    import contextlib

    import sqlalchemy as sa

    from quanta.db import normalise_url

    @contextlib.contextmanager
    def cm():  # type: ignore[no-untyped-def]
        name = f"{prefix}{uuid.uuid4().hex[:10]}"  # generated here, never input
        admin = sa.create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.engine.make_url(normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as c:
                c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                          {"n": name})
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            admin.dispose()
    return cm()


def measure(kind: str, master_url: str, responses_url: str, n: int, size: int, repeat: int) -> dict:
    q, b = [], []
    asyncio.run(quanta_once(master_url, responses_url, min(n, 500), min(size, 500), iid=10_000))  # warm-up
    bare_once(responses_url, min(n, 500), min(size, 500), "bare_results")
    for r in range(repeat):
        q.append(asyncio.run(quanta_once(master_url, responses_url, n, size, iid=r + 1)))
        b.append(bare_once(responses_url, n, size, "bare_results"))
    qm, bm = statistics.median(q), statistics.median(b)
    return {"db": kind, "n": n, "quanta_s": qm, "bare_s": bm, "quanta_rate": n / qm, "bare_rate": n / bm,
            "ratio": bm / qm}


RETAINED_DEVICES = 50_000  # devices per retained instruction
RETAINED_FIRST = 1_000_000  # instruction id of the first one (above any measured one)
SEED_CHUNK = 1_000_000


def seed_retained(url: str, m: int) -> float:
    """``m`` answered rows of instructions RETAINED_FIRST..., in chunks of SEED_CHUNK, then ANALYZE;
    returns the seconds it took."""
    import sqlalchemy as sa

    from quanta.db import make_engine, partitions

    engine = make_engine(url)
    now = time.time()
    with engine.connect() as c:
        partitioned = partitions.is_partitioned(c)
    if partitioned:
        partitions.ensure(engine, [now + 3600 + k * 86400 for k in range(7)])
    t0 = time.perf_counter()
    for lo in range(0, m, SEED_CHUNK):
        with engine.begin() as c:
            c.execute(sa.text(
                "INSERT INTO results (instruction_id, device_id, state, columns, rows, error, updated_at, expires_at) "
                "SELECT :first + g / :per, 'ret-' || lpad((g % :per)::text, 6, '0'), 'success', "
                "CAST('[\"Device\", \"Row\", \"Data\"]' AS JSON), "
                "CAST('[[\"ret\", 0, \"' || repeat('x', 32) || '\"]]' AS JSON), NULL, :now, "
                ":now + 3600 + ((g / :per) % 7) * 86400 FROM generate_series(:lo, :hi) AS g"),
                {"first": RETAINED_FIRST, "per": RETAINED_DEVICES, "now": now, "lo": lo, "hi": min(m, lo + SEED_CHUNK) - 1})
        print(f"# retained: {min(m, lo + SEED_CHUNK):,} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql("ANALYZE results")
    engine.dispose()
    return time.perf_counter() - t0


def page_times(url: str, iids: list[int]) -> list[str]:
    """Median of 5 timings of the results-page queries, for each instruction: first page and last
    page of the row view (100 rows), and the state counts."""
    from quanta.db import make_engine, store

    engine = make_engine(url)
    out = []
    for iid in iids:
        total, _ = store.page_result_rows(engine, iid, 0, 100)
        timings = {}
        for what, fn in (("first page", lambda: store.page_result_rows(engine, iid, 0, 100)),
                         ("last page", lambda: store.page_result_rows(engine, iid, max(0, total - 100), 100)),
                         ("state counts", lambda: store.state_counts(engine, iid))):
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            timings[what] = statistics.median(ts)
        out.append(f"results page, instruction {iid} ({total:,} rows): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
    engine.dispose()
    return out


def purge_times(url: str) -> list[str]:
    """The response-TTL purge on the big store: a cut-off at the start of the third retained day
    (the first days end before it: their partitions are dropped whole), then one just after the
    third day's rows expired (row by row in that day, 5,000 rows a transaction, for the purge's
    1 s budget)."""
    from quanta.db import make_engine, partitions, store

    engine = make_engine(url)
    first_day = int((time.time() + 3600) // partitions.DAY)
    out = []
    for what, cutoff in (("whole days", (first_day + 2) * partitions.DAY),
                         ("row by row (1 s budget)", time.time() + 3600 + 2 * partitions.DAY)):
        t0 = time.perf_counter()
        n = store.purge_expired(engine, now=cutoff)
        dt = time.perf_counter() - t0
        out.append(f"purge {what}: {n:,} rows in {dt:.2f} s ({n / dt:,.0f} rows/s)")
    engine.dispose()
    return out


def main() -> None:
    from quanta.db import migrate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--database-url", default=os.environ.get("QUANTA_TEST_PG_URL"))
    ap.add_argument("--retained", type=int, default=0, help="rows already in results (PostgreSQL)")
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--compare-unpartitioned", action="store_true",
                    help="also time the results-page reads on the same retained rows in an unpartitioned table")
    ap.add_argument("--quick", action="store_true", help="N = 1,000")
    a = ap.parse_args()
    n = 1000 if a.quick else a.n
    size = min(a.batch, n)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; load average {os.getloadavg()}")
    rows = []
    pages: list[str] = []
    if not a.skip_sqlite:
        with tempfile.TemporaryDirectory() as d:
            m, r = f"sqlite:///{d}/master.db", f"sqlite:///{d}/responses.db"
            migrate(m, "master")
            migrate(r, "responses")
            rows.append(measure("SQLite", m, r, n, size, a.repeat))
    if a.database_url:
        with pg_database(a.database_url) as url:
            migrate(url, "master")
            migrate(url, "responses")
            if a.retained:
                took = seed_retained(url, a.retained)
                print(f"# {a.retained:,} rows retained in {took:.0f} s; load average {os.getloadavg()}")
            rows.append(measure("PostgreSQL", url, url, n, size, a.repeat))
            rows[-1]["retained"] = a.retained
            pages = page_times(url, [1] + ([RETAINED_FIRST] if a.retained else []))
            if a.retained:
                pages += purge_times(url)
        if a.compare_unpartitioned and a.retained:  # the same reads on the schema before responses_0004
            from alembic import command

            from quanta.db import alembic_config

            with pg_database(a.database_url) as url:
                command.upgrade(alembic_config(url, "responses"), "responses_0003")
                seed_retained(url, a.retained)
                pages += [f"{line} (unpartitioned, responses_0003)" for line in page_times(url, [RETAINED_FIRST])]
    else:
        print("# PostgreSQL skipped: pass --database-url or set QUANTA_TEST_PG_URL")
    print(f"# load average after {os.getloadavg()}")
    print("| Database | retained | N | batch | Core ingest | responses/s | bare executemany | rows/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['db']} | {x.get('retained', 0):,} | {x['n']:,} | {size:,} | {x['quanta_s']:.3f} s | "
              f"{x['quanta_rate']:,.0f} | {x['bare_s']:.3f} s | {x['bare_rate']:,.0f} | {x['ratio']:.2f} |")
    for line in pages:
        print(f"# PostgreSQL: {line}")
    worst = min(rows, key=lambda x: x["ratio"])
    print(f"ingest N={n} " + " ".join(f"{x['db']}={x['quanta_rate']:.0f}/s(bare {x['bare_rate']:.0f}/s, "
                                       f"{x['ratio']:.2f})" for x in rows) + f" ratio={worst['ratio']:.2f}")


if __name__ == "__main__":
    main()
