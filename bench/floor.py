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


def _server(pki_root: str, port: int, n: int, q: mp.Queue, control: mp.Queue) -> None:
    """The bare server: accepts N connections, then runs one fan-out/fan-in round per "round" command on
    ``control`` and reports (total seconds, seconds to the first reply, server CPU seconds)."""
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
        state: dict = {"pending": 0, "done": None, "first": None}

        class L(WSListener):
            def on_ws_connected(self, t):  # type: ignore[no-untyped-def]
                self.t = t
                conns.append(t)
                if len(conns) == n:
                    all_in.set()

            def on_ws_frame(self, t, frame):  # type: ignore[no-untyped-def]
                if frame.msg_type is WSMsgType.BINARY:
                    if state["first"] is None:
                        state["first"] = time.perf_counter()
                    state["pending"] -= 1
                    if state["pending"] == 0:
                        state["done"].set()

        all_in = asyncio.Event()
        # the Switch's TLS stack: aiofastnet's direct OpenSSL engine on the socket BIO (quanta.switch.tls)
        ctx = lean_tls(Pki(Path(pki_root)).server_context(require_client_cert=True))
        await ws_create_server(lambda _r: L(), "127.0.0.1", port, ssl=ctx, read_buffer_init_size=1024,
                               use_aiofastnet=True, max_frame_size=1 << 20)
        q.put(("ready", None))
        cpu0 = cpu()
        await all_in.wait()
        q.put(("connected", cpu() - cpu0))
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, control.get)
            if cmd != "round":
                return
            state.update(pending=n, done=asyncio.Event(), first=None)
            c0, t0 = cpu(), time.perf_counter()
            for t in conns:
                t.send(WSMsgType.BINARY, QUESTION)
            await state["done"].wait()
            q.put(("round", (time.perf_counter() - t0, state["first"] - t0, cpu() - c0)))

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


class FloorRig:
    """N bare mutual-TLS connections kept open, so that floor rounds can be interleaved with other
    measurements (bench/question.py: floor, question, floor, question, ... on the same machine state)."""

    def __init__(self, n: int, processes: int | None = None) -> None:
        self.n, self.processes = n, processes
        self._procs: list = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "FloorRig":
        from quanta.simulate.runner import default_processes

        ctxmp = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        pki_root, crt, key = _pki(Path(self._tmp.name))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.q: mp.Queue = ctxmp.Queue()
        self.control: mp.Queue = ctxmp.Queue()
        try:
            srv = ctxmp.Process(target=_server, args=(str(pki_root), port, self.n, self.q, self.control),
                                daemon=True)
            srv.start()
            self._procs.append(srv)
            assert self.q.get(timeout=30)[0] == "ready"
            P = self.processes or max(1, default_processes(self.n))
            t0 = time.perf_counter()
            for w in range(P):
                c = ctxmp.Process(target=_clients, args=(str(pki_root / "ca.crt"), str(crt), str(key), port,
                                                         (w + 1) * self.n // P - w * self.n // P, self.q),
                                  daemon=True)
                c.start()
                self._procs.append(c)
            self.info: dict = {"n": self.n, "client_processes": P}
            while "connect_cpu" not in self.info:
                kind, val = self.q.get(timeout=600)
                if kind == "connected":
                    self.info["connect_seconds"] = time.perf_counter() - t0
                    self.info["connect_cpu"] = val
            self.info["handshake_cpu_ms"] = self.info["connect_cpu"] / self.n * 1000
        except BaseException:
            self.__exit__()
            raise
        time.sleep(0.5)
        return self

    def _clients_cpu(self) -> float:
        import psutil

        total = 0.0
        for pr in self._procs[1:]:
            t = psutil.Process(pr.pid).cpu_times()
            total += t.user + t.system
        return total

    def round(self) -> dict:
        """One fan-out/fan-in: {"seconds", "first" (to the first reply), "cpu" (server CPU seconds),
        "clients_cpu" (the echo clients' CPU seconds over the round)}."""
        c0 = self._clients_cpu()
        self.control.put("round")
        while True:
            kind, val = self.q.get(timeout=600)
            if kind == "round":
                total, first, cpu = val
                return {"seconds": total, "first": first, "cpu": cpu, "clients_cpu": self._clients_cpu() - c0}

    def __exit__(self, *exc: object) -> None:
        for pr in self._procs:
            pr.kill()
            pr.join(5)
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def measure_floor(n: int, rounds: int = 5, processes: int | None = None) -> dict:
    """Run the bare fan-out/fan-in with N mutual-TLS connections, ``rounds`` times; return the figures."""
    with FloorRig(n, processes) as rig:
        rs = []
        for _ in range(rounds):
            rs.append(rig.round())
            time.sleep(0.3)
        out = dict(rig.info)
    out["rounds"] = [r["seconds"] for r in rs]
    out["median"] = statistics.median(out["rounds"])
    out["first"] = statistics.median(r["first"] for r in rs)
    out["cpu_per_qa_us"] = statistics.median(r["cpu"] for r in rs) / n * 1e6
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
