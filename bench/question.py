"""End to end: from issuing a question through the Consumer API until every device has a final
state and all responses are committed in the Responses database, against the floor measured in the
same run, round by round.

    python bench/question.py [--n 1000 10000 50000] [--switches S] [--rounds 5] [--quick]
                             [--database-url postgresql://...]

For each N: keeps a floor rig open (bench/floor.py: bare fan-out/fan-in over N/S mutual-TLS
connections, one Switch's share), starts a ``quanta server`` with S Switches (default: 1 up to 15,000
devices, else 3), enrols N simulated devices with ``quanta enroll-batch``, connects them with the
fleet simulator, then runs ``--rounds`` rounds of: one floor round, one question
(``@x = Device.GetSummary();``). Each round's ratio is its question over its floor (x S); the
report gives the median of those per-round ratios with their spread, so a machine that drifts during
the run moves both sides of each ratio alike. Also reported: the issue call, the time to the first
committed answer beside the floor's time to its first reply, 50/95/100 % committed (from the rows'
``updated_at``), and CPU seconds per component, summed beside the floor's (its server and its echo
clients, x S): on 2 cores the floor's round already keeps both busy, so the question cannot be
faster than its share of the CPU allows, and ``cpu_ratio`` says how far that is. The last line holds
``ratio=`` (median per-round ratio), ``first_excess=`` (median first answer minus floor first reply,
seconds) and ``cpu_ratio=`` (median per-round question CPU over floor CPU).

Where the first answer's time goes: each round also reads the milestones the Core and the Switches
export on their /metrics (``quanta.metrics.Milestones``, always on; the bench gives them ports) and
reports them from the POST's start: the Core's ``issue`` call, ``handed_out`` (the Work pushed),
``targets_written`` and ``activated``; the Switch's ``work`` (received), ``first_deliver`` /
``last_deliver`` (the fan-out's first and last Deliver written to a socket), ``first_answer`` (read
from a device), ``first_batch`` (written to the Core link); the Core's ``first_batch`` (received)
and ``first_commit``. The floor's counterpart of ``first_deliver -> first_answer`` is its first reply.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BenchServer, cpu_delta, cpu_of, machine, sim_procs, wait_until  # noqa: E402
from floor import FloorRig  # noqa: E402

PAYLOAD = "@x = Device.GetSummary();"
ACKED_TIMEOUT = 60.0  # after a round, every device's ResponseAck must arrive within this long: the
# Switches send them once answers pause, and they belong to the round that caused them, not to the
# next floor round (the bench waits for them before it goes on)


def commit_times(server: BenchServer, iid: int, t0: float) -> list[float]:
    import sqlalchemy as sa

    from quanta.db import make_engine
    from quanta.db.tables import results
    from quanta.settings import DataDir, load_settings

    s = load_settings(server.root)
    eng = make_engine(DataDir(server.root).responses_url(s))
    with eng.connect() as c:
        ts = sorted(r[0] - t0 for r in c.execute(sa.select(results.c.updated_at).where(
            results.c.instruction_id == iid, results.c.state == "success")))
    eng.dispose()
    return ts


# (label, component, event) in the order of one question's life; "switch" is the earliest Switch
PHASES = (("post->core issue", "core", "issue"), ("targets read", "core", "targets_read"),
          ("work pushed", "core", "handed_out"), ("switch got work", "switch", "work"),
          ("first Deliver", "switch", "first_deliver"), ("last Deliver", "switch", "last_deliver"),
          ("targets written", "core", "targets_written"), ("activated", "core", "activated"),
          ("first answer at switch", "switch", "first_answer"), ("first batch sent", "switch", "first_batch"),
          ("first batch at core", "core", "first_batch"), ("first commit", "core", "first_commit"),
          ("last answer at switch", "switch", "last_answer"), ("last batch sent", "switch", "last_batch"),
          ("last commit", "core", "last_commit"), ("finished", "core", "finished"))


def phase_times(server: BenchServer, iid: int, t0: float) -> dict[str, float]:
    """label -> seconds from the POST's start (missing if a component did not record it)."""
    got = server.milestones()
    out: dict[str, float] = {}
    for label, comp, event in PHASES:
        ts = [times[event] for name, (i, times) in got.items()
              if name.startswith(comp) and i == iid and event in times]
        if ts:  # the earliest Switch's first, the latest Switch's last
            out[label] = (max(ts) if event.startswith("last") else min(ts)) - t0
    return out


def pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, max(0, int(round(q * len(ts))) - 1))]


def run(n: int, switches: int, rounds: int, database_url: str | None, verbose: bool = True) -> dict:
    from quanta.client import ConsumerClient
    from quanta.simulate import Fleet, FleetRunner, SimConfig
    from quanta.simulate.enroll import enroll_batch

    share = -(-n // switches)
    out = []
    with tempfile.TemporaryDirectory(prefix="quanta-bench-") as d, contextlib.ExitStack() as stack:
        server = BenchServer(Path(d) / "server", switches, database_url)
        server.init()  # its ports first: the floor rig's connections take many of 127.0.0.1's ephemeral ports
        t = time.perf_counter()
        enroll_batch(server.root, "sim-", n, Path(d) / "fleet")
        enrol_s = time.perf_counter() - t
        rig = stack.enter_context(FloorRig(share))
        server.start()
        # above ~15,000 devices the simulator connects from 127.0.0.2+ so 127.0.0.1 keeps free ports
        runner = FleetRunner(Fleet.load(Path(d) / "fleet"),
                             SimConfig(seed=1, source_ip="127.0.0.2" if n > 15000 else None))
        runner.start()
        try:
            wait_until(lambda: runner.poll()["connected"] >= n, 120 + n / 50, f"{n} devices connected")
            connect_s = runner.connected_at - runner.started
            procs = {**server.components(), **sim_procs(runner)}
            time.sleep(1.0)
            ttl = max(60, n // 500)  # gather window
            with ConsumerClient.for_data_dir(server.root) as api:
                for r in range(rounds):
                    fl = rig.round()  # the floor of this round, on this round's machine state
                    floor_sum = fl["seconds"] * switches
                    floor_cpu = (fl["cpu"] + fl["clients_cpu"]) * switches  # server and echo clients
                    time.sleep(0.3)
                    c0 = cpu_of(procs)
                    t0 = time.time()
                    iid = api.issue(PAYLOAD, instruction_ttl=ttl)["id"]
                    issued = time.time() - t0
                    s = api.wait(iid, ttl + 30)  # long poll: no status polling load
                    e2e = time.time() - t0
                    cpu = cpu_delta(c0, cpu_of(procs))
                    assert s["states"] == {"success": n}, s
                    ts = commit_times(server, iid, t0)
                    assert len(ts) == n
                    ph = phase_times(server, iid, t0)
                    row = {"e2e": e2e, "floor": floor_sum, "floor_first": fl["first"], "ratio": e2e / floor_sum,
                           "cpu_floor": floor_cpu, "cpu_question": sum(cpu.values()),
                           "issue": issued, "first": ts[0], "p50": pct(ts, .5), "p95": pct(ts, .95),
                           "p100": ts[-1], "cpu": cpu, "phases": ph}
                    out.append(row)
                    if verbose:
                        print(f"#  round {r + 1}: floor {floor_sum:.3f}s (first reply {fl['first']:.3f}), question "
                              f"{e2e:.3f}s = {row['ratio']:.2f}x (issue call {issued:.3f}s, first {ts[0]:.3f}, "
                              f"50% {row['p50']:.3f}, 95% {row['p95']:.3f}, 100% {ts[-1]:.3f}); CPU " +
                              ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())) +
                              f" = {row['cpu_question']:.2f} s against the floor's {floor_cpu:.2f} (server and "
                              f"clients) = {row['cpu_question'] / floor_cpu:.2f}x", flush=True)
                        print("#    from POST: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in ph.items()) + " ms",
                              flush=True)
                    acked = n * (r + 1)  # each device acknowledged its answer of every round so far
                    wait_until(lambda: runner.poll()["acks"] >= acked, ACKED_TIMEOUT,
                               f"round {r + 1}'s acknowledgements at the devices")
        finally:
            runner.stop()
            server.stop()
    ratios = sorted(r["ratio"] for r in out)
    mid = sorted(out, key=lambda r: r["ratio"])[len(out) // 2]
    return {"n": n, "switches": switches, "median": statistics.median(r["e2e"] for r in out),
            "floor_sum": statistics.median(r["floor"] for r in out), "ratio": statistics.median(ratios),
            "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "first": statistics.median(r["first"] for r in out),
            "floor_first": statistics.median(r["floor_first"] for r in out),
            "first_excess": statistics.median(r["first"] - r["floor_first"] for r in out),
            "issue": statistics.median(r["issue"] for r in out),
            "cpu_ratio": statistics.median(r["cpu_question"] / r["cpu_floor"] for r in out),
            "phases": {label: statistics.median(r["phases"][label] for r in out if label in r["phases"])
                       for label, _, _ in PHASES if any(label in r["phases"] for r in out)},
            "rounds": out, "mid": mid, "connect_s": connect_s, "enrol_s": enrol_s, "floor_info": rig.info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1000, 10000, 50000])
    ap.add_argument("--switches", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--quick", action="store_true", help="N = 1,000")
    a = ap.parse_args()
    ns = [1000] if a.quick else a.n
    print(f"# {machine()}")
    results = []
    for n in ns:
        sw = a.switches or (1 if n <= 15000 else 3)
        results.append(run(n, sw, a.rounds, a.database_url))
    print("| N | Switches | median question | median floor (x Switches) | ratio: median of rounds (min-max) "
          "| issue call | first answer / floor first reply | 50% | 95% | 100% | CPU s (median round) "
          "| CPU s question / floor, median of rounds |")
    print("|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|---|")
    for r in results:
        m = r["mid"]
        cpu: dict[str, float] = {}
        for k, v in m["cpu"].items():
            key = "switches" if k.startswith("switch:") else "simulator" if k.startswith("simulate") else k
            cpu[key] = cpu.get(key, 0.0) + v
        print(f"| {r['n']:,} | {r['switches']} | {r['median']:.3f} s | {r['floor_sum']:.3f} s | "
              f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['issue'] * 1000:.0f} ms | "
              f"{r['first']:.3f} / {r['floor_first']:.3f} s | {m['p50']:.3f} | {m['p95']:.3f} | {m['p100']:.3f} | " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())) +
              f" | {m['cpu_question']:.2f} / {m['cpu_floor']:.2f} ({r['cpu_ratio']:.2f}x) |")
    print()
    print("Milestones, median of rounds, ms from the POST's start (floor: first reply after its first send):")
    print("| N | " + " | ".join(label for label, _, _ in PHASES) + " | deliver->answer / floor first reply |")
    print("|---:|" + "---:|" * (len(PHASES) + 1))
    for r in results:
        ph = r["phases"]
        da = [x["phases"]["first answer at switch"] - x["phases"]["first Deliver"] for x in r["rounds"]
              if "first answer at switch" in x["phases"] and "first Deliver" in x["phases"]]
        tail = f"{statistics.median(da) * 1000:.0f} / {r['floor_first'] * 1000:.0f}" if da else "-"
        print(f"| {r['n']:,} | " + " | ".join(f"{ph[label] * 1000:.0f}" if label in ph else "-"
                                              for label, _, _ in PHASES) + f" | {tail} |")
    r = results[-1]
    print(f"question N={r['n']} switches={r['switches']} median={r['median']:.3f}s floor={r['floor_sum']:.3f}s "
          f"ratio={r['ratio']:.2f} spread={r['ratio_min']:.2f}-{r['ratio_max']:.2f} "
          f"first_excess={r['first_excess']:.3f}s cpu_ratio={r['cpu_ratio']:.2f}")


if __name__ == "__main__":
    main()
