"""Export benchmark (issue 12): N devices x 10 result rows written straight into a Responses
database with the store's bulk writes (insert_targets + ingest), then exported as CSV through
the Consumer API app served by uvicorn in its own process (the web tier's code, plain HTTP on
loopback), sampling that process's RSS with psutil while the stream is read. Run for 5,000 and
50,000 devices: a flat peak RSS means the export streams.

    python bench/export.py --devices 5000 50000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from _harness import free_port  # noqa: E402

PASSWORD = "bench-password-not-secret"
ROWS = 10


def build(root: Path, devices: int) -> int:
    from quanta.consumer_api.app import hash_password
    from quanta.db import make_engine, migrate, store, tables
    from quanta.pki import Pki
    from quanta.roles import FULL_ADMIN

    for which in ("master", "responses"):
        migrate(f"sqlite:///{root / which}.db", which)
    Pki(root / "pki").create("localhost")
    master, responses = make_engine(f"sqlite:///{root}/master.db"), make_engine(f"sqlite:///{root}/responses.db")
    with master.begin() as c:
        c.execute(tables.users.insert().values(username="admin", password_hash=hash_password(PASSWORD),
                                               role=FULL_ADMIN, created_at=time.time()))
        iid = c.execute(tables.instructions.insert().values(
            name="bench", kind="question", payload="@x = Process.List();", parameters={}, scope=None,
            status="finished", created_by="admin", created_at=time.time(), targeted=devices)).inserted_primary_key[0]
    names = [f"dev-{i:06d}" for i in range(devices)]
    store.insert_targets(responses, iid, dict.fromkeys(names, True), time.time() + 86400)
    cols = ["Name", "Pid", "Memory", "Started", "Path"]
    for i in range(0, devices, 5000):
        store.ingest(responses, [dict(instruction_id=iid, device_id=d, state="success", columns=cols, error=None,
                                      rows=[[f"proc-{r}", 1000 + r, 1_000_000 * (r + 1), 1.7e9 + r,
                                             f"/usr/bin/proc-{r},\"quoted\""] for r in range(ROWS)])
                                 for d in names[i:i + 5000]])
    return iid


SERVE = """
import sys, uvicorn
sys.path.insert(0, {src!r})
from pathlib import Path
from quanta.consumer_api.app import ConsumerApi, create_app
from quanta.db import make_engine
from quanta.pki import Signer
root = Path({root!r})
api = ConsumerApi(make_engine(f"sqlite:///{{root}}/master.db"), make_engine(f"sqlite:///{{root}}/responses.db"),
                  Signer.from_file(root / "pki" / "signing.key"),
                  core_url="https://127.0.0.1:9", core_token="t")
uvicorn.run(create_app(api), host="127.0.0.1", port={port}, log_level="warning")
"""


def run(devices: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        iid = build(root, devices)
        built = time.perf_counter() - t0
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVE.format(src=str(ROOT / "src"), root=str(root), port=port)])
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/Consumer/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the web tier did not start")
                time.sleep(0.2)
            token = httpx.post(f"{base}/Consumer/Authentication/Token",
                               json={"username": "admin", "password": PASSWORD}).json()["token"]
            ps = psutil.Process(proc.pid)
            before = ps.memory_info().rss
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], ps.memory_info().rss)
                    stop.wait(0.05)

            threading.Thread(target=sample, daemon=True).start()
            t1 = time.perf_counter()
            size = lines = 0
            with httpx.stream("GET", f"{base}/Consumer/Instructions/{iid}/Export", params={"format": "csv"},
                              headers={"Authorization": f"Bearer {token}"}, timeout=600) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    lines += chunk.count(b"\r\n")
            took = time.perf_counter() - t1
            stop.set()
            assert lines == devices * ROWS + 1, lines
            return {"devices": devices, "rows": devices * ROWS, "build_s": built, "export_s": took,
                    "mb": size / 1e6, "rss_before_mb": before / 1e6, "rss_peak_mb": peak[0] / 1e6}
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[5000, 50000])
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    for n in args.devices:
        m = run(n)
        print(f"{m['devices']:>6} devices, {m['rows']:>7} rows: export {m['export_s']:.1f} s, {m['mb']:.1f} MB CSV, "
              f"web tier RSS {m['rss_before_mb']:.0f} MB before, {m['rss_peak_mb']:.0f} MB peak "
              f"(setup {m['build_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
