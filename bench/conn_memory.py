"""Memory per idle mutual-TLS WebSocket connection in a bare picows server, by variant: what
each part of the Switch's connection stack costs.

    python bench/conn_memory.py [--n 3000] [--variants all]

The server is one process like a Switch (picows + uvloop); N clients in two other processes
connect with their own certificate (one certificate shared by all clients: the server keeps a
parsed copy per connection either way). Reported: (server RSS with N connected - RSS before) / N
after a full garbage collection, and glibc's in-use heap per connection (``mallinfo2``; uvloop's
256 KiB read buffer per connection is counted there in full, but only its touched pages are
resident). Variants:

* ``uvloop``: uvloop's SSLProtocol (two memory BIOs, a 256 KiB read buffer per connection);
* ``aiofastnet``: aiofastnet's direct OpenSSL engine on the socket BIO (what the Switch uses);
* ``p256``: the client certificate holds a P-256 key (before: Ed25519) and a SAN;
* ``headers``: the upgrade's header dictionaries kept (the Switch clears them);
* ``autoping``: picows' auto-ping task per connection (the Switch sweeps instead).

The last line holds ``ratio=`` = the Switch's variant (aiofastnet) / the target of 32 KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import multiprocessing as mp
import os
import socket
import ssl
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

VARIANTS = {
    "uvloop": dict(engine="uvloop"),
    "uvloop+p256": dict(engine="uvloop", p256=True),
    "aiofastnet+p256": dict(engine="aiofastnet", p256=True),
    "aiofastnet+headers": dict(engine="aiofastnet", headers=True),
    "aiofastnet+autoping": dict(engine="aiofastnet", autoping=True),
    "aiofastnet": dict(engine="aiofastnet"),
}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _heap_kib() -> int:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0
    f.restype = MallInfo2
    m = f()
    return (m.uordblks + m.hblkhd) // 1024


def _server(root: str, port: int, n: int, v: dict, q: mp.Queue) -> None:
    import uvloop
    from picows import WSListener, ws_create_server

    from quanta.pki import Pki
    from quanta.switch.tls import lean_tls

    conns: list = []
    keep_headers = v.get("headers", False)

    async def main() -> None:
        done = asyncio.Event()

        class L(WSListener):
            def on_ws_connected(self, t):  # type: ignore[no-untyped-def]
                if not keep_headers:
                    t.request.headers.clear()
                    t.response.headers.clear()
                conns.append(t)
                if len(conns) == n:
                    done.set()

        ctx = Pki(Path(root)).server_context(require_client_cert=True)
        ctx.num_tickets = 1
        fast = v["engine"] == "aiofastnet"
        if fast:
            lean_tls(ctx)
        ping = {"enable_auto_ping": True, "auto_ping_idle_timeout": 120} if v.get("autoping") else {}
        await ws_create_server(lambda _r: L(), "127.0.0.1", port, ssl=ctx, read_buffer_init_size=1024,
                               use_aiofastnet=fast, max_frame_size=1 << 20, **ping)
        gc.collect()
        await asyncio.sleep(0.3)
        r0, h0 = _rss_kib(), _heap_kib()
        q.put("ready")
        await done.wait()
        await asyncio.sleep(2)
        gc.collect()
        q.put(((_rss_kib() - r0) / n, (_heap_kib() - h0) / n))
        await asyncio.sleep(3600)

    uvloop.run(main())


def _clients(ca: str, crt: str, key: str, port: int, n: int) -> None:
    import uvloop
    from picows import WSListener, ws_connect

    async def main() -> None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(crt, key)
        sem = asyncio.Semaphore(128)

        async def one() -> None:
            for _ in range(20):
                try:
                    async with sem:
                        await ws_connect(WSListener, f"wss://localhost:{port}/", ssl_context=ctx,
                                         use_aiofastnet=False, read_buffer_init_size=1024)
                    return
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(3600)

    uvloop.run(main())


def measure(name: str, n: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.asymmetric import ec

    import quanta.pki as qpki

    v = VARIANTS[name]
    d = Path(tempfile.mkdtemp(prefix="quanta-connmem-"))
    pki = qpki.Pki(d / "pki")
    pki.create("localhost")
    pki.write_crl()
    if v.get("p256"):  # the device certificates issued before: P-256 key and a SAN
        orig = qpki.new_client_key
        qpki.new_client_key = lambda: ec.generate_private_key(ec.SECP256R1())  # type: ignore[assignment,return-value]
        try:
            pki.issue("sim-000001", d / "c.crt", d / "c.key", san=["sim-000001"])
        finally:
            qpki.new_client_key = orig  # type: ignore[assignment]
    else:
        pki.issue("sim-000001", d / "c.crt", d / "c.key")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = mp.get_context("spawn")
    q: mp.Queue = c.Queue()
    procs = [c.Process(target=_server, args=(str(pki.root), port, n, v, q), daemon=True)]
    procs[0].start()
    try:
        assert q.get(timeout=60) == "ready"
        for i in range(2):
            p = c.Process(target=_clients, args=(str(pki.ca_crt), str(d / "c.crt"), str(d / "c.key"), port,
                                                 (i + 1) * n // 2 - i * n // 2), daemon=True)
            p.start()
            procs.append(p)
        rss, heap = q.get(timeout=600)
    finally:
        for p in procs:
            p.kill()
            p.join(5)
    return rss, heap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="N = 1,000, the Switch's variant only")
    a = ap.parse_args()
    n, names = (1000, ["aiofastnet"]) if a.quick else (a.n, a.variants)
    print(f"| variant (N = {n:,}) | RSS / connection | heap in use / connection |")
    print("|---|---:|---:|")
    res = {}
    for name in names:
        rss, heap = res[name] = measure(name, n)
        print(f"| {name} | {rss:.1f} KiB | {heap:.1f} KiB |", flush=True)
    if "aiofastnet" in res:
        print(f"conn_memory N={n} switch_stack={res['aiofastnet'][0]:.1f}KiB "
              f"ratio={res['aiofastnet'][0] / 32:.2f}")


if __name__ == "__main__":
    main()
