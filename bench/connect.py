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

Baselines measured in the same run: ``bench/floor.py``'s bare picows TLS server, as many of them
as there are Switches, connecting the same number of clients in all (N / S each, all at once:
the floor at the same count on the same cores). The last line holds ``ratio=`` = connect time /
floor connect time (target ≤ 1.5), and ``storm_ratio=`` = storm / connect time (target ≤ 1.5).

While connecting, the simulator's progress is sampled every second: handshakes per second over
the first and the second half of the fleet (``linearity=`` = second half's rate / first half's;
1.0 is a connect time linear in the fleet), the simulator's failed connects and its handshake
window (``quanta.simulate.fleet.ConnectWindow``), and the simulator's CPU per handshake beside
the Switches'. ``--source-ip 127.0.0.2`` (the default above 10,000 devices) binds simulator worker
W to 127.0.0.(2+W).
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


def rss(procs) -> int:  # type: ignore[no-untyped-def]
    return sum(p.memory_info().rss for p in procs.values())


def floor_fleet(n: int, servers: int) -> dict:
    """``servers`` bare floor servers at once, N clients in all: connect time (the last server's),
    and server CPU per handshake."""
    import threading

    from floor import FloorRig

    shares = [(i + 1) * n // servers - i * n // servers for i in range(servers)]
    rigs = [FloorRig(k) for k in shares]
    errors: list[BaseException] = []

    def enter(rig) -> None:  # type: ignore[no-untyped-def]
        try:
            rig.__enter__()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=enter, args=(r,)) for r in rigs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        infos = [r.info for r in rigs]
    finally:
        for r in rigs:
            r.__exit__()
    return {"connect_seconds": max(i["connect_seconds"] for i in infos),
            "handshake_cpu_ms": sum(i["connect_cpu"] for i in infos) / n * 1000}


def halves(samples: list[tuple[float, int]], n: int) -> tuple[float, float]:
    """Handshakes per second over the first and the second half of the fleet, from (t, connected)
    samples (interpolated at N/2)."""
    t_half = t_end = None
    prev = (0.0, 0)
    for t, c in samples:
        if t_half is None and c >= n / 2:
            t_half = prev[0] + (t - prev[0]) * ((n / 2 - prev[1]) / max(1, c - prev[1]))
        if c >= n:
            t_end = t
            break
        prev = (t, c)
    if t_half is None or t_end is None or t_half <= 0 or t_end <= t_half:
        return float("nan"), float("nan")
    return (n / 2) / t_half, (n / 2) / (t_end - t_half)


def run(n: int, switches: int, source_ip: str | None) -> dict:
    from _harness import sim_procs
    from quanta.simulate import Fleet, FleetRunner, SimConfig
    from quanta.simulate.enroll import enroll_batch

    fl = floor_fleet(n, switches)
    print(f"# floor: {switches} bare servers, {n:,} clients: {fl['connect_seconds']:.2f} s; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="quanta-bench-") as d:
        server = BenchServer(Path(d) / "server", switches)
        server.init()
        enroll_batch(server.root, "sim-", n, Path(d) / "fleet")
        server.start()
        sw = {k: v for k, v in server.components().items() if k.startswith("switch:")}
        time.sleep(0.5)
        rss0 = rss(sw)
        c0 = cpu_of(sw)
        runner = FleetRunner(Fleet.load(Path(d) / "fleet"),
                             SimConfig(seed=1, retry_min=1.0, retry_max=60.0, source_ip=source_ip))
        load0 = os.getloadavg()[0]
        runner.start()
        try:
            samples: list[tuple[float, int]] = []
            windows: list[int] = []
            deadline = time.monotonic() + 60 + n / 20
            while True:
                t = runner.poll()
                samples.append((time.monotonic() - runner.started, t["connected"]))
                windows.append(t["window"])
                if t["connected"] >= n:
                    break
                if time.monotonic() > deadline or not runner.alive():
                    raise TimeoutError(f"{t['connected']} of {n} devices connected: {t}")
                time.sleep(0.25)
            connect_s = runner.connected_at - runner.started
            connect_cpu = sum(cpu_delta(c0, cpu_of(sw)).values())
            sim_cpu = sum(cpu_of(sim_procs(runner)).values())
            first_rate, second_rate = halves(samples, n)
            at_connect = runner.poll()
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
            "sim_cpu": sim_cpu, "first_rate": first_rate, "second_rate": second_rate,
            "linearity": second_rate / first_rate, "failures": at_connect["connect_failures"],
            "window_max": max(windows), "window_median": sorted(windows)[len(windows) // 2],
            "load": (load0 + os.getloadavg()[0]) / 2, "processes": runner.processes,
            "rss_per_conn": per_conn, "storm_s": storm_s, "storm_cpu": storm_cpu,
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
    ap.add_argument("--source-ip", default=None, help="simulator worker W binds to this address + W "
                    "(default: 127.0.0.2 above 10,000 devices)")
    a = ap.parse_args()
    ns = [1000] if a.quick else a.n
    print(f"# {machine()}")
    rs = []
    for n in ns:
        sw = a.switches or (1 if n <= 15000 else 3)
        rs.append(run(n, sw, a.source_ip or ("127.0.0.2" if n > 10000 else None)))
    print("| N | Switches | connect | Switch CPU | per handshake | floor connect (S bare servers, N clients) | ratio "
          "| Switch RSS / connection | storm settle | storm / connect | Switch CPU in storm | per reconnect "
          "| TLS resumed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        print(f"| {r['n']:,} | {r['switches']} | {r['connect_s']:.2f} s | {r['connect_cpu']:.2f} s | "
              f"{r['connect_cpu'] / r['n'] * 1000:.2f} ms | {r['floor_connect']:.2f} s | {r['ratio']:.2f} | "
              f"{r['rss_per_conn'] / 1024:.1f} KiB | {r['storm_s']:.2f} s | {r['storm_ratio']:.2f} | "
              f"{r['storm_cpu']:.2f} s | {r['storm_cpu_per_reconnect'] * 1000:.2f} ms | {r['resumed']:,} |")
    print()
    print("| N | simulator processes | simulator CPU per handshake | handshakes/s, 1st half | 2nd half | linearity "
          "| failed connects | handshake window (median, max) | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        print(f"| {r['n']:,} | {r['processes']} | {r['sim_cpu'] / r['n'] * 1000:.2f} ms | {r['first_rate']:.0f} | "
              f"{r['second_rate']:.0f} | {r['linearity']:.2f} | {r['failures']:,} | {r['window_median']}, "
              f"{r['window_max']} | {r['load']:.1f} |")
    r = rs[-1]
    print(f"connect N={r['n']} switches={r['switches']} load={r['load']:.1f} linearity={r['linearity']:.2f} "
          f"failures={r['failures']} resumed={r['resumed']}/{r['n']} connect={r['connect_s']:.2f}s floor_connect={r['floor_connect']:.2f}s "
          f"storm={r['storm_s']:.2f}s storm_ratio={r['storm_ratio']:.2f} "
          f"rss_per_conn={r['rss_per_conn'] / 1024:.1f}KiB resumed={r['resumed']} "
          f"reconnect_cpu_vs_connect={r['storm_cpu_per_reconnect'] / (r['connect_cpu'] / r['n']):.2f} "
          f"ratio={r['ratio']:.2f}")


if __name__ == "__main__":
    main()
