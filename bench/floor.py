"""The physical floor: bare picows + uvloop WebSocket server over mutual TLS (the Switch's TLS
engine: aiofastnet's direct OpenSSL engine on the socket BIO), doing nothing but
fan-out (one ~300-byte message to every connection) and fan-in (one ~100-byte reply from each).

    python bench/floor.py [--n 10000] [--rounds 5] [--quick]

The server is one process (like one Switch); the clients are spread over processes of their own.
Reports the median fan-out/fan-in time, the time and server CPU to connect N clients (the
TLS handshakes), and server CPU per question+answer. ``--quick``: N = 1,000. The last line holds
``ratio=`` = median / (27 µs × N + 0 s), the per-message cost measured for the issue on this kind
of machine, so 1.0 means "as fast as the figure in the issue".
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

QUESTION = b"q" * 300
ANSWER = b"a" * 100


def _pki(tmp: Path) -> tuple[Path, Path, Path]:
    from quanta.pki import Pki

    pki = Pki(tmp / "pki")
    pki.create("localhost")
    pki.issue("floor-client", tmp / "client.crt", tmp / "client.key")
    return pki.root, tmp / "client.crt", tmp / "client.key"


def _server(pki_root: str, port: int, n: int, rounds: int, q: mp.Queue) -> None:
    import resource

    import uvloop
    from picows import WSListener, WSMsgType, ws_create_server

    from quanta.pki import Pki
    from quanta.switch.tls import lean_tls

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async def main() -> None:
        conns: list = []
        state = {"pending": 0, "done": None}

        class L(WSListener):
            def on_ws_connected(self, t):  # type: ignore[no-untyped-def]
                self.t = t
                conns.append(t)
                if len(conns) == n:
                    all_in.set()

            def on_ws_frame(self, t, frame):  # type: ignore[no-untyped-def]
                if frame.msg_type is WSMsgType.BINARY:
                    state["pending"] -= 1
                    if state["pending"] == 0:
                        state["done"].set()

        all_in = asyncio.Event()
        # the Switch's TLS stack: aiofastnet's direct OpenSSL engine on the socket BIO (quanta.switch.tls)
        ctx = lean_tls(Pki(Path(pki_root)).server_context(require_client_cert=True))
        await ws_create_server(lambda _r: L(), "127.0.0.1", port, ssl=ctx, read_buffer_init_size=1024,
                               use_aiofastnet=True, max_frame_size=1 << 20)
        q.put(("ready", None))
        cpu0, t0 = cpu(), None
        await all_in.wait()
        q.put(("connected", cpu() - cpu0))
        await asyncio.sleep(0.5)
        times, cpus = [], []
        for _ in range(rounds):
            state["pending"] = n
            state["done"] = asyncio.Event()
            c0, t0 = cpu(), time.perf_counter()
            for t in conns:
                t.send(WSMsgType.BINARY, QUESTION)
            await state["done"].wait()
            times.append(time.perf_counter() - t0)
            cpus.append(cpu() - c0)
            await asyncio.sleep(0.3)
        q.put(("rounds", (times, cpus)))
        await asyncio.sleep(3600)

    uvloop.run(main())


def _clients(ca: str, crt: str, key: str, port: int, n: int, q: mp.Queue) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, ws_connect

    async def main() -> None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(crt, key)

        class C(WSListener):
            def on_ws_frame(self, t, frame):  # type: ignore[no-untyped-def]
                if frame.msg_type is WSMsgType.BINARY:
                    t.send(WSMsgType.BINARY, ANSWER)

        sem = asyncio.Semaphore(256)

        async def one() -> None:
            # a reset or timeout under a connect burst (full accept backlog) is retried, as an agent would
            for attempt in range(20):
                try:
                    async with sem:
                        await ws_connect(C, f"wss://localhost:{port}/", ssl_context=ctx, use_aiofastnet=False,
                                         read_buffer_init_size=1024, websocket_handshake_timeout=60)
                    return
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError("floor client could not connect after 20 attempts")

        await asyncio.gather(*(one() for _ in range(n)))
        q.put(("clients", n))
        await asyncio.sleep(3600)

    uvloop.run(main())


def measure_floor(n: int, rounds: int = 5, processes: int | None = None) -> dict:
    """Run the bare fan-out/fan-in with N mutual-TLS connections; return the figures."""
    from quanta.simulate.runner import default_processes

    ctxmp = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        pki_root, crt, key = _pki(Path(d))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q: mp.Queue = ctxmp.Queue()
        srv = ctxmp.Process(target=_server, args=(str(pki_root), port, n, rounds, q), daemon=True)
        srv.start()
        assert q.get(timeout=30)[0] == "ready"
        P = processes or max(1, default_processes(n))
        t0 = time.perf_counter()
        clients = [ctxmp.Process(target=_clients, args=(str(pki_root / "ca.crt"), str(crt), str(key), port,
                                                        (w + 1) * n // P - w * n // P, q), daemon=True)
                   for w in range(P)]
        for c in clients:
            c.start()
        out: dict = {"n": n, "client_processes": P}
        try:
            while "rounds" not in out:
                kind, val = q.get(timeout=600)
                if kind == "connected":
                    out["connect_seconds"] = time.perf_counter() - t0
                    out["connect_cpu"] = val
                elif kind == "rounds":
                    times, cpus = val
                    out["rounds"] = times
                    out["median"] = statistics.median(times)
                    out["cpu_per_qa_us"] = statistics.median(cpus) / n * 1e6
        finally:
            for pr in (srv, *clients):
                pr.kill()
                pr.join(5)
        out["handshake_cpu_ms"] = out["connect_cpu"] / n * 1000
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1000, 10000, 19000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N = 1,000")
    a = ap.parse_args()
    ns = [1000] if a.quick else a.n
    print("| N | fan-out/fan-in median | rounds | server CPU per Q+A | connect N | server CPU per handshake |")
    print("|---:|---:|---|---:|---:|---:|")
    last = None
    for n in ns:
        f = measure_floor(n, a.rounds)
        last = f
        print(f"| {n:,} | {f['median']:.3f} s | {' '.join(f'{t:.3f}' for t in f['rounds'])} | "
              f"{f['cpu_per_qa_us']:.1f} µs | {f['connect_seconds']:.2f} s | {f['handshake_cpu_ms']:.2f} ms |",
              flush=True)
    assert last is not None
    issue_figure = 27e-6 * last["n"]
    print(f"floor N={last['n']} median={last['median']:.4f}s cpu_per_qa={last['cpu_per_qa_us']:.1f}us "
          f"connect={last['connect_seconds']:.2f}s ratio={last['median'] / issue_figure:.2f} "
          f"(vs 27 us x N, the issue's TLS figure)")


if __name__ == "__main__":
    main()
