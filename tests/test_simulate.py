"""The fleet simulator and batch enrolment: real certificates, protocol-true agents, synthetic
answers with the configured mix, churn, and the CLI's one-line summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from conftest import half_open, make_server, quanta, wait_until
from quanta.client import ConsumerClient
from quanta.simulate import Fleet, FleetRunner, SimConfig, enroll_batch, latency_sampler


def test_latency_specs() -> None:
    rnd = random.Random(1)
    assert latency_sampler("0", rnd)() == 0
    assert latency_sampler("fixed:0.5", rnd)() == 0.5
    assert all(1 <= latency_sampler("uniform:1:2", rnd)() <= 2 for _ in range(100))
    assert latency_sampler("exp:0.1", rnd)() >= 0
    assert latency_sampler("lognormal:0:0.5", rnd)() > 0
    for bad in ("uniform:1", "bogus:1", "exp:x"):
        with pytest.raises(ValueError):
            latency_sampler(bad, rnd)


def test_enroll_batch_issues_one_certificate_per_device(tmp_path: Path) -> None:
    server = make_server(tmp_path, "--switches", "2")
    fleet, _ = enroll_batch(server.root, "unit-", 25, tmp_path / "fleet")
    assert len(fleet.names) == 25 and len(fleet.switches) == 2
    serials, names = set(), set()
    for n in fleet.names:
        pem = fleet.pem_bytes(n)
        assert b"PRIVATE KEY" in pem
        cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
        names.add(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        serials.add(cert.serial_number)
    assert names == set(fleet.names) and len(serials) == 25
    with sqlite3.connect(server.root / "master.db") as db:
        assert db.execute("SELECT COUNT(*) FROM devices WHERE device_id LIKE 'unit-%'").fetchone()[0] == 25
    # Enrolling more keeps the earlier devices in the fleet file.
    enroll_batch(server.root, "unit-", 5, tmp_path / "fleet", start=26)
    assert len(Fleet.load(tmp_path / "fleet").names) == 30


def test_simulated_answers_follow_the_configured_mix(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "mix-", 200, tmp_path / "fleet")
    server.start()
    cfg = SimConfig(rows=3, row_size=10, latency="uniform:0:0.3", failure_rate=0.2, nocontent_rate=0.2, seed=7)
    runner = FleetRunner(fleet, cfg, processes=2)
    runner.start()
    try:
        wait_until(lambda: runner.poll()["connected"] == 200, 30, "200 connected", server)
        with ConsumerClient.for_data_dir(server.root) as api:
            iid = api.issue("@x = Device.GetSummary();", instruction_ttl=30)["id"]
            status = api.wait(iid, 30)
            results = api.all_results(iid)
        states = status["states"]
        assert status["status"] == "finished" and sum(states.values()) == 200, status
        assert 15 <= states.get("error", 0) <= 70 and 15 <= states.get("nocontent", 0) <= 70, states
        for r in results:
            if r["status"] == "success":
                assert len(r["rows"]) == 3 and r["rows"][0][0] == r["device"] and len(r["rows"][0][2]) == 10
        assert runner.poll()["executions"] == 200
    finally:
        runner.stop()
        server.stop()


def test_churn_and_the_cli_summary(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    quanta("enroll-batch", str(server.root), "--count", "60", "--prefix", "churn-", "--out", str(tmp_path / "fleet"))
    server.start()
    status = tmp_path / "status.json"
    r = quanta("simulate", str(tmp_path / "fleet"), "--duration", "8", "--churn", "6", "--churn-downtime", "0.5",
               "--retry-min", "0.2", "--retry-max", "0.5", "--status-file", str(status), "--no-progress",
               timeout=60)
    server.stop()
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("simulate: ") and "/60 devices connected" in line, line
    s = json.loads(status.read_text())
    assert s["connect_seconds"] is not None, s  # all 60 connected at some point
    assert s["churned"] >= 10 and s["connects"] > 60, s  # devices left and came back


def test_a_connection_never_welcomed_is_dropped_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose WebSocket opened but whose Welcome never arrived must not stay 'connecting'
    forever: the watchdog drops it after WELCOME_TIMEOUT and dials again, until it is welcomed."""
    import asyncio

    from quanta.simulate import fleet as sf

    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "nowel-", 20, tmp_path / "fleet")
    server.start()
    monkeypatch.setattr(sf, "WELCOME_TIMEOUT", 1.0)
    monkeypatch.setattr(sf, "WATCHDOG_INTERVAL", 0.2)
    from picows import WSMsgType

    lost: set[str] = set()
    real_on_frame = sf.SimDevice.on_ws_frame

    def lose_first_welcome(self, transport, frame):  # type: ignore[no-untyped-def]
        if frame.msg_type is WSMsgType.BINARY and self.name not in lost:  # the first frame is the Welcome:
            lost.add(self.name)  # every device's first one goes missing
            return
        real_on_frame(self, transport, frame)

    monkeypatch.setattr(sf.SimDevice, "on_ws_frame", lose_first_welcome)
    counters = [0] * len(sf.COUNTERS)
    cfg = SimConfig(retry_min=0.05, retry_max=0.2, seed=3)
    sim = sf.Simulator(fleet, fleet.names, 0, cfg, counters, 0)
    welcomed: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sim.run(stop))
        deadline = asyncio.get_running_loop().time() + 30
        while counters[sf.C["connected"]] < 20 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        welcomed.extend(d.name for d in sim.devices if d.up)
        stop.set()
        await task

    try:
        asyncio.run(main())
    finally:
        server.stop()
    assert sorted(welcomed) == sorted(fleet.names), counters
    assert counters[sf.C["connects"]] == 20, counters
    assert counters[sf.C["welcome_timeouts"]] >= 20 and len(lost) == 20, counters


def test_source_ip_binds_each_worker_to_its_own_loopback_address(tmp_path: Path) -> None:
    """--source-ip 127.0.0.5: worker 0 connects from 127.0.0.5, worker 1 from 127.0.0.6, so large
    local runs do not use up 127.0.0.1's ports."""
    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "src-", 10, tmp_path / "fleet")
    server.start()
    runner = FleetRunner(fleet, SimConfig(source_ip="127.0.0.5", seed=1), processes=2)
    runner.start()
    try:
        wait_until(lambda: runner.poll()["connected"] == 10, 30, "10 connected", server)

        def addresses() -> set[str]:
            with sqlite3.connect(server.root / "master.db") as db:
                return {r[0] for r in db.execute("SELECT address FROM devices WHERE device_id LIKE 'src-%'")}

        wait_until(lambda: addresses() == {"127.0.0.5", "127.0.0.6"}, 15, "addresses recorded", server)
    finally:
        runner.stop()
        server.stop()


# ------------------------------------------------------------------ hostile: stalled connections, bad plans
def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset
        return True


@pytest.mark.slow
def test_devices_get_in_through_a_flood_of_half_open_connections(tmp_path: Path) -> None:
    """2,000 connections that never start TLS and one that stops half-way through its ClientHello
    are held while 300 real devices connect: every device is welcomed meanwhile, and the Switch
    closes each stalled connection at its TLS handshake timeout (it holds a descriptor no longer)."""
    from quanta.switch.service import TLS_HANDSHAKE_TIMEOUT

    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "flood-", 300, tmp_path / "fleet")
    server.start()
    runner = None
    flood = half_open(server.switch, 2000)
    partial = socket.create_connection(("127.0.0.1", server.switch), 5)
    # a TLS record header announcing a 512-byte ClientHello, and only its first bytes
    partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 16)
    partial.setblocking(False)
    t0 = time.monotonic()
    try:
        runner = FleetRunner(fleet, SimConfig(seed=5, retry_min=0.5, retry_max=2.0), processes=1)
        runner.start()
        wait_until(lambda: runner.poll()["connected"] == 300, 60, "300 devices connected through the flood", server)
        if time.monotonic() - t0 < TLS_HANDSHAKE_TIMEOUT - 2:  # ... while the flood was still held
            assert not [s for s in flood if _closed_by_peer(s)], "the Switch dropped stalled connections early"
        wait_until(lambda: _closed_by_peer(partial), TLS_HANDSHAKE_TIMEOUT + 15, "the partial ClientHello closed",
                   server)
        open_ = [s for s in flood if not _closed_by_peer(s)]
        wait_until(lambda: not [s for s in open_ if not _closed_by_peer(s)], TLS_HANDSHAKE_TIMEOUT + 15,
                   "every stalled connection closed by the Switch", server)
        closed_after = time.monotonic() - t0
        assert closed_after >= TLS_HANDSHAKE_TIMEOUT - 1, closed_after  # not before its timeout
        assert runner.poll()["connected"] == 300  # the devices stayed
    finally:
        for s in flood:
            s.close()
        partial.close()
        if runner is not None:
            runner.stop()
        server.stop()


def test_a_plan_the_addresses_or_descriptors_cannot_carry_is_refused_clearly(tmp_path: Path) -> None:
    """`quanta simulate` refuses, before it starts a worker, a fleet that its source addresses or a
    process's open-file limit cannot carry, and says what to change (exit code 2)."""
    import resource

    server = make_server(tmp_path)
    quanta("enroll-batch", str(server.root), "--count", "700", "--prefix", "plan-", "--out", str(tmp_path / "fleet"))
    fleet = str(tmp_path / "fleet")
    r = quanta("simulate", fleet, "--processes", "3", "--source-ip", "127.255.255.254", "--duration", "1",
               "--no-progress", check=False)
    assert r.returncode == 2 and "outside the loopback network 127.0.0.0/8" in r.stderr, r
    r = quanta("simulate", fleet, "--source-ip", "192.0.2.7", "--duration", "1", "--no-progress", check=False)
    assert r.returncode == 2 and "source address 192.0.2.7 cannot be bound" in r.stderr, r

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    r = quanta("simulate", fleet, "--processes", "1", "--duration", "1", "--no-progress", check=False,
               preexec_fn=low_limit)
    assert r.returncode == 2 and "700 connections per process" in r.stderr and "--processes 2 or more" in r.stderr, r
    # without --processes the same limit gives enough processes: it runs
    r = quanta("simulate", fleet, "--count", "10", "--duration", "0.5", "--no-progress", check=False,
               preexec_fn=low_limit)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("simulate: "), r


# ------------------------------------------------------------------ stopping while devices dial
def _stop_mid_dial(sim, arm) -> list[str]:  # type: ignore[no-untyped-def]
    """Run ``sim`` until the stop ``arm(stop)`` sets (from a callback, at the moment that matters),
    and return every error that reached the event loop's exception handler or was logged as a
    warning or worse, up to
    half a second after the simulator stopped (dials still under way end meanwhile)."""
    import asyncio
    import logging

    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:  # picows reports a listener's exception as a warning
                errors.append(record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else ""))

    catch = Catch()
    logging.getLogger().addHandler(catch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
        stop = asyncio.Event()
        arm(loop, stop)
        task = asyncio.create_task(sim.run(stop))
        await asyncio.wait_for(stop.wait(), 30)
        await task
        await asyncio.sleep(0.5)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(catch)
    return errors


def test_stopping_while_devices_dial_raises_nothing_and_leaves_nothing_open(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator stops the moment the first device's WebSocket opens, while the others' dials
    are still under way: each dial that opens after the stop is closed at once, without a protocol
    error from its already closed session (it used to raise LocalProtocolError)."""
    from quanta.simulate import fleet as sf

    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "stopdial-", 60, tmp_path / "fleet")
    server.start()
    late: list[str] = []  # devices whose WebSocket opened after the simulator had closed their session
    real = sf.SimDevice.on_ws_connected

    def arm(loop, stop) -> None:  # type: ignore[no-untyped-def]
        def on_ws_connected(self, transport):  # type: ignore[no-untyped-def]
            if self.session.state is sf.State.CLOSED:
                late.append(self.name)
            stop.set()  # the first one to open stops the simulator; run() sees it after this turn
            real(self, transport)
        monkeypatch.setattr(sf.SimDevice, "on_ws_connected", on_ws_connected)

    try:
        counters = [0] * len(sf.COUNTERS)
        sim = sf.Simulator(fleet, fleet.names, 0, SimConfig(seed=5), counters, 0)
        errors = _stop_mid_dial(sim, arm)
    finally:
        server.stop()
    assert errors == []
    assert late, "no dial opened after the stop: the test did not test the race"
    assert counters[sf.C["connects"]] < 60, counters  # stopped mid-way: not every device was welcomed
    assert all(d.transport is None or d.transport.is_disconnected for d in sim.devices)


def test_stopping_while_dials_fail_raises_nothing(tmp_path: Path) -> None:
    """As above, where the dials fail after the stop: a listener in place of the Switch takes the
    TCP connections and resets them only once the simulator has stopped."""
    from quanta.simulate import fleet as sf

    server = make_server(tmp_path)  # its PKI and Switch port; the server itself is not started
    fleet, _ = enroll_batch(server.root, "faildial-", 20, tmp_path / "fleet")
    listener = socket.create_server(("127.0.0.1", server.switch), backlog=64)
    accepted: list[socket.socket] = []
    release = threading.Event()

    def arm(loop, stop) -> None:  # type: ignore[no-untyped-def]
        def accept() -> None:
            listener.settimeout(0.1)
            while len(accepted) < 20:
                with contextlib.suppress(TimeoutError):
                    accepted.append(listener.accept()[0])
            loop.call_soon_threadsafe(stop.set)  # every device is mid-handshake: stop
            release.wait(10)
            for s in accepted:  # then reset them all: their handshakes fail after the stop
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        threading.Thread(target=accept, daemon=True).start()
        loop.call_soon(lambda: asyncio.ensure_future(_release_after_stop(stop, release)))

    counters = [0] * len(sf.COUNTERS)
    sim = sf.Simulator(fleet, fleet.names, 0, SimConfig(seed=6), counters, 0)
    try:
        errors = _stop_mid_dial(sim, arm)
    finally:
        release.set()
        listener.close()
    assert len(accepted) == 20
    assert errors == []
    assert counters[sf.C["connects"]] == 0 and counters[sf.C["connect_failures"]] == 0, counters


async def _release_after_stop(stop: asyncio.Event, release: threading.Event) -> None:
    await stop.wait()
    await asyncio.sleep(0)  # run() has closed the sessions by the next turn
    await asyncio.sleep(0.02)
    release.set()
