"""Connecting a fleet, and the reconnect storm after every Switch is killed.

    python bench/connect.py [--n 10000] [--switches S] [--quick]

Measures, against a ``quanta server`` with S Switches and N simulated devices (each its own
certificate, mutual TLS):

* time for all N to connect (first process start to the last Welcome) and the Switches' CPU;
* Switch memory per connection: (Switch RSS with N connected - RSS before) / N;
* the storm: every Switch process is SIGKILLed at once, the Switch Host restarts them, and every
  device reconnects with the agent's jittered back-off (1 s minimum, like a real agent); time
  from the kill until all N are connected again, with the Switches' CPU for it;
* how many reconnects resumed a TLS session, and the Switch CPU per reconnect against per first
  connect (the restarted Switches' CPU, less their start-up CPU, / N).

Baselines measured in the same run: ``bench/floor.py``'s bare picows TLS server connecting the
same number of clients per Switch. The last line holds ``ratio=`` = connect time / floor
connect time, and ``storm_ratio=`` = storm / connect time (target ≤ 1.5).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BenchServer, cpu_delta, cpu_of, machine, wait_until  # noqa: E402
from floor import measure_floor  # noqa: E402


def rss(procs) -> int:  # type: ignore[no-untyped-def]
    return sum(p.memory_info().rss for p in procs.values())


def run(n: int, switches: int) -> dict:
    from quanta.simulate import Fleet, FleetRunner, SimConfig
    from quanta.simulate.enroll import enroll_batch

    share = -(-n // switches)
    fl = measure_floor(share, rounds=1)
    with tempfile.TemporaryDirectory(prefix="quanta-bench-") as d:
        server = BenchServer(Path(d) / "server", switches)
        server.init()
        enroll_batch(server.root, "sim-", n, Path(d) / "fleet")
        server.start()
        sw = {k: v for k, v in server.components().items() if k.startswith("switch:")}
        time.sleep(0.5)
        rss0 = rss(sw)
        c0 = cpu_of(sw)
        runner = FleetRunner(Fleet.load(Path(d) / "fleet"), SimConfig(seed=1, retry_min=1.0, retry_max=60.0))
        runner.start()
        try:
            wait_until(lambda: runner.poll()["connected"] >= n, 60 + n / 100, f"{n} devices connected")
            connect_s = runner.connected_at - runner.started
            connect_cpu = sum(cpu_delta(c0, cpu_of(sw)).values())
            time.sleep(1.0)
            rss1 = rss(sw)
            per_conn = (rss1 - rss0) / n
            # the storm
            before = runner.poll()
            pids = server.switch_pids()
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: runner.poll()["disconnects"] - before["disconnects"] >= n, 30, "every device dropped")
            wait_until(lambda: len(set(server.switch_pids()) - set(pids)) == switches, 30, "switches restarted")
            sw2 = {k: v for k, v in server.components().items() if k.startswith("switch:")}
            c1 = cpu_of(sw2)
            wait_until(lambda: runner.poll()["connected"] >= n, 120 + n / 50, "storm settled")
            storm_s = time.monotonic() - t0
            storm_cpu = sum(cpu_of(sw2).values())  # new processes: all their CPU is start-up + storm
            after = runner.poll()
        finally:
            runner.stop()
            server.stop()
    return {"n": n, "switches": switches, "connect_s": connect_s, "connect_cpu": connect_cpu,
            "rss_per_conn": per_conn, "storm_s": storm_s, "storm_cpu": storm_cpu, "storm_cpu_reconnect": storm_cpu - sum(c1.values()) * 0,
            "resumed": after["resumed"] - before["resumed"], "floor_connect": fl["connect_seconds"],
            # a restarted Switch's CPU less what starting a Switch costs (its CPU before any device came)
            "storm_cpu_per_reconnect": (storm_cpu - sum(c0.values())) / n,
            "floor_handshake_ms": fl["handshake_cpu_ms"], "ratio": connect_s / fl["connect_seconds"],
            "storm_ratio": storm_s / connect_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[10000])
    ap.add_argument("--switches", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="N = 1,000")
    a = ap.parse_args()
    ns = [1000] if a.quick else a.n
    print(f"# {machine()}")
    rs = []
    for n in ns:
        sw = a.switches or (1 if n <= 15000 else 3)
        rs.append(run(n, sw))
    print("| N | Switches | connect | Switch CPU | per handshake | floor connect (per Switch share) | ratio "
          "| Switch RSS / connection | storm settle | storm / connect | Switch CPU in storm | per reconnect "
          "| TLS resumed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        print(f"| {r['n']:,} | {r['switches']} | {r['connect_s']:.2f} s | {r['connect_cpu']:.2f} s | "
              f"{r['connect_cpu'] / r['n'] * 1000:.2f} ms | {r['floor_connect']:.2f} s | {r['ratio']:.2f} | "
              f"{r['rss_per_conn'] / 1024:.1f} KiB | {r['storm_s']:.2f} s | {r['storm_ratio']:.2f} | "
              f"{r['storm_cpu']:.2f} s | {r['storm_cpu_per_reconnect'] * 1000:.2f} ms | {r['resumed']:,} |")
    r = rs[-1]
    print(f"connect N={r['n']} connect={r['connect_s']:.2f}s floor_connect={r['floor_connect']:.2f}s "
          f"storm={r['storm_s']:.2f}s storm_ratio={r['storm_ratio']:.2f} "
          f"rss_per_conn={r['rss_per_conn'] / 1024:.1f}KiB resumed={r['resumed']} "
          f"reconnect_cpu_vs_connect={r['storm_cpu_per_reconnect'] / (r['connect_cpu'] / r['n']):.2f} "
          f"ratio={r['ratio']:.2f}")


if __name__ == "__main__":
    main()
