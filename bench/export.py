"""Export benchmark (issue 12): a real server (``quanta init`` + ``quanta server``), an
instruction of N devices x 10 result rows written straight into its Responses database with the
store's bulk writes, then ``GET /Consumer/Instructions/{id}/Export?format=csv`` read over HTTPS
while the web tier's RSS is sampled (psutil, every 50 ms). Run for 5,000 and 50,000 devices: the
same peak RSS means the export streams.

    python bench/export.py --devices 5000 50000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchServer, machine  # noqa: E402
from _results import admin, seed  # noqa: E402

ROWS = 10


def run(devices: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        s = BenchServer(Path(tmp) / "server", switches=1)
        s.init()
        s.start()
        try:
            t0 = time.perf_counter()
            iid = seed(s.root, devices, ROWS)
            built = time.perf_counter() - t0
            base = f"https://127.0.0.1:{s.https}"
            user, password = admin(s.root)
            with httpx.Client(base_url=base, verify=False, timeout=600) as c:
                token = c.post("/Consumer/Authentication/Token", json={"username": user, "password": password}).json()["token"]
                web = s.components()["web"]
                before = web.memory_info().rss
                peak = [before]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], web.memory_info().rss)
                        stop.wait(0.05)

                threading.Thread(target=sample, daemon=True).start()
                t1 = time.perf_counter()
                size = lines = 0
                with c.stream("GET", f"/Consumer/Instructions/{iid}/Export", params={"format": "csv"},
                              headers={"Authorization": f"Bearer {token}"}) as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes():
                        size += len(chunk)
                        lines += chunk.count(b"\n")  # one byte: never split across chunks
                took = time.perf_counter() - t1
                stop.set()
            assert lines == devices * ROWS + 1, lines
            return {"devices": devices, "rows": devices * ROWS, "build_s": built, "export_s": took,
                    "mb": size / 1e6, "rss_before_mb": before / 1e6, "rss_peak_mb": peak[0] / 1e6}
        finally:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[5000, 50000])
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; load average {os.getloadavg()}")
    for n in args.devices:
        m = run(n)
        print(f"{m['devices']:>6} devices, {m['rows']:>7} rows: export {m['export_s']:.1f} s "
              f"({m['rows'] / m['export_s']:,.0f} rows/s), {m['mb']:.1f} MB CSV; web tier RSS "
              f"{m['rss_before_mb']:.0f} MB before, {m['rss_peak_mb']:.0f} MB peak (seeding {m['build_s']:.1f} s)",
              flush=True)


if __name__ == "__main__":
    main()
