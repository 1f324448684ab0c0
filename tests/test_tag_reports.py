"""Tag changes on a live connection, the pure parts: the TagReport message and its bounds, the agent's
session (report a change at once when welcomed, at the Welcome before it, never the same tags twice), the
Switch's coalescing (the latest tags per device, at most once per TAGS_MIN_INTERVAL, a pending
announcement carries them, a new hello supersedes an old report, chunks that fit the link), and the store
write that only the device's own Switch can make."""

from __future__ import annotations

import time

import msgspec
import pytest
import sqlalchemy as sa

from quanta import protocol as p
from quanta.agent.journal import MemoryStore
from quanta.db import make_engine, migrate, store
from quanta.db.tables import devices
from quanta.protocol.agent_session import AgentSession, Backoff, Close, Send
from quanta.protocol.switch_batches import (FLUSH_INTERVAL, TAGS_MIN_INTERVAL, Announce, ReportTags, SendBatch,
                                            SwitchBatches)


# ------------------------------------------------------------------------------- the message
def test_tag_report_round_trips_and_is_bounded_as_the_hello() -> None:
    report = p.TagReport(tags={"site": "paris", "owner": "\u2603 ops"})
    assert p.decode_from_agent(p.encode(report)) == report
    assert p.decode_from_agent(p.encode(p.TagReport())) == p.TagReport(tags={})
    for bad in ({str(i): "" for i in range(p.MAX_TAGS + 1)},  # too many
                {"k" * 129: "v"}, {"k": "v" * 1025},  # oversize
                {"": "v"}, {"k": "v\nX-Injected: 1"}, {"k\x00": "v"}, {"k": "\x7f"}):  # empty, control characters
        with pytest.raises(p.ProtocolError, match="malformed"):
            p.decode_from_agent(msgspec.msgpack.encode({"type": "tags", "tags": bad}))
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_agent(msgspec.msgpack.encode({"type": "tags", "tags": ["a", "b"]}))
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_agent(msgspec.msgpack.encode({"type": "tags", "tags": {"a": 1}}))


def test_device_tags_is_bounded_on_the_core_side_and_only_the_switch_sends_it() -> None:
    msg = p.DeviceTags(devices={"d1": {"a": "b"}, "d2": {}})
    assert p.decode_from_switch(p.encode(msg)) == msg
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_switch(msgspec.msgpack.encode({"type": "device_tags", "devices": {"d": {"k": "v" * 1025}}}))
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_switch(msgspec.msgpack.encode({"type": "device_tags", "devices": {"": {}}}))
    with pytest.raises(p.ProtocolError):  # an agent's message is not the Core's
        p.decode_from_switch(p.encode(p.TagReport(tags={})))
    with pytest.raises(p.ProtocolError):  # nor the other way round
        p.decode_from_agent(p.encode(msg))


# --------------------------------------------------------------------------- the agent's side
class _Anything:
    def verify(self, body: bytes, signature: bytes) -> bool:
        return True


def _session() -> AgentSession:
    return AgentSession(MemoryStore(), _Anything(), Backoff(1, 60))


def _hello(tags: dict[str, str]) -> p.Hello:
    return p.Hello(device_id="d1", fqdn="", os="", agent_version="1", tags=tags)


def _welcome() -> bytes:
    return p.encode(p.Welcome(switch="sw", heartbeat_seconds=60))


def _reports(effects: list) -> list[dict[str, str]]:  # type: ignore[type-arg]
    return [e.message.tags for e in effects if isinstance(e, Send) and isinstance(e.message, p.TagReport)]


def test_agent_reports_a_change_at_once_and_never_the_same_tags_twice() -> None:
    s = _session()
    assert s.tags({"a": "1"}, 0.0) == []  # no connection: the next hello carries them
    s.connected(_hello({"a": "1"}), 1.0)
    assert s.tags({"a": "2"}, 1.1) == []  # before the Welcome: nothing may be sent yet
    assert _reports(s.receive(_welcome(), 1.2)) == [{"a": "2"}]  # ... it goes with the Welcome
    assert s.tags({"a": "2"}, 1.3) == []  # unchanged: nothing
    assert _reports(s.tags({"a": "2", "b": "x"}, 1.4)) == [{"a": "2", "b": "x"}]
    assert _reports(s.tags({}, 1.5)) == [{}]  # every tag cleared is a change too
    s.lost("gone", 2.0)
    assert s.tags({"c": "3"}, 2.1) == []  # down: the hello will say
    s.connected(_hello({"c": "3"}), 3.0)
    assert _reports(s.receive(_welcome(), 3.1)) == []  # the hello said it already


def test_a_tag_report_from_the_switch_is_a_protocol_error_for_the_agent() -> None:
    s = _session()
    s.connected(_hello({}), 0.0)
    s.receive(_welcome(), 0.1)
    [close] = s.receive(p.encode(p.TagReport(tags={})), 0.2)
    assert isinstance(close, Close) and close.code == 1002


# --------------------------------------------------------------------------- the Switch's side
def _info(dev: str, tags: dict[str, str] | None = None) -> p.DeviceInfo:
    return p.DeviceInfo(device_id=dev, fqdn="", os="", agent_version="1", tags=tags or {})


def _linked(limit: int = 1 << 20) -> SwitchBatches:
    b = SwitchBatches(limit)
    assert b.link_up() == []
    return b


def _announced(b: SwitchBatches, *devs: str, now: float = 0.0) -> None:
    for d in devs:
        b.device_online(_info(d), now)
    assert any(isinstance(e, Announce) for e in b.flush(now + FLUSH_INTERVAL))


def test_switch_gathers_a_devices_latest_tags_and_sends_them_at_most_once_a_second() -> None:
    b = _linked()
    _announced(b, "a", "b")
    t = 10.0
    assert b.tags_changed(_info("a", {"n": "1"}), 20, t) is True  # due FLUSH_INTERVAL from now
    assert b.flush_at() == pytest.approx(t + FLUSH_INTERVAL)
    assert b.flush(t) == []
    # a flood from one device: each report replaces the last; nothing is due sooner
    for i in range(10_000):
        assert b.tags_changed(_info("a", {"n": str(i)}), 20, t + i * 1e-6) is False
    assert b.tags_changed(_info("b", {"x": "y"}), 20, t + 0.01) is False  # joins the same flush
    assert b.flush(t + FLUSH_INTERVAL) == [ReportTags({"a": {"n": "9999"}, "b": {"x": "y"}})]
    assert b.flush_at() is None
    # a's next report waits until TAGS_MIN_INTERVAL after its last one; the flood keeps only the latest
    sent_at = t + FLUSH_INTERVAL
    for i in range(1000):
        b.tags_changed(_info("a", {"n": f"again {i}"}), 20, sent_at + 0.1 + i * 1e-4)
    assert b.flush_at() == pytest.approx(sent_at + TAGS_MIN_INTERVAL)
    assert b.flush(sent_at + 0.5) == []
    assert b.flush(sent_at + TAGS_MIN_INTERVAL) == [ReportTags({"a": {"n": "again 999"}})]
    # over a long flood, the Core hears of the device about once per TAGS_MIN_INTERVAL
    reports, now = 0, sent_at + TAGS_MIN_INTERVAL
    while now < sent_at + 20:
        now += 0.003
        b.tags_changed(_info("a", {"n": str(now)}), 20, now)
        due = b.flush_at()
        if due is not None and due <= now:
            reports += sum(1 for e in b.flush(now) if isinstance(e, ReportTags))
    assert 18 <= reports <= 20


def test_a_pending_announcement_carries_the_new_tags_and_a_new_hello_supersedes_a_report() -> None:
    b = _linked()
    b.device_online(_info("a", {"old": "1"}), 0.0)
    assert b.tags_changed(_info("a", {"new": "2"}), 20, 0.001) is False
    out = b.flush(FLUSH_INTERVAL)
    assert out == [Announce([_info("a", {"new": "2"})])]  # no separate report
    # a report waits, then the device connects again with a newer hello: only the hello goes
    b.tags_changed(_info("a", {"report": "older"}), 20, 1.0)
    b.device_online(_info("a", {"hello": "newer"}), 1.001)
    out = b.flush(1.0 + FLUSH_INTERVAL + 0.01)
    assert out == [Announce([_info("a", {"hello": "newer"})])]
    assert b.flush_at() is None


def test_tag_reports_wait_while_the_link_is_down_and_a_new_link_announces_them() -> None:
    b = _linked()
    _announced(b, "a")
    b.link_lost()
    assert b.tags_changed(_info("a", {"k": "v"}), 20, 5.0) is False  # nothing is sent while down
    assert b.flush(6.0) == [] and b.flush_at() is None
    assert b.link_up() == []  # the shell's full DevicesOnline carries the connection's latest tags
    assert b.flush(7.0) == [] and b.flush_at() is None


def test_tag_reports_are_cut_to_fit_the_link() -> None:
    b = _linked(limit=1000)
    devs = [f"d{i}" for i in range(10)]
    _announced(b, *devs)
    for d in devs:
        b.tags_changed(_info(d, {"k": "v" * 300}), 310, 1.0)
    out = b.flush(1.0 + FLUSH_INTERVAL)
    assert all(isinstance(e, ReportTags) for e in out) and [len(e.devices) for e in out] == [3, 3, 3, 1]
    assert [d for e in out for d in e.devices] == devs
    assert all(len(p.encode(p.DeviceTags(devices=e.devices))) <= 1000 for e in out)
    # answers still go as before, after the reports of the same flush
    b.tags_changed(_info("d0", {"k": "w"}), 10, 5.0)
    b.answered("d1", p.Response(instruction_id=1, status="success"), 10, 5.0 + FLUSH_INTERVAL)
    assert [type(e) for e in b.flush(5.0 + FLUSH_INTERVAL)] == [ReportTags, SendBatch]


# --------------------------------------------------------------------------- the store write
def test_store_writes_tags_only_through_the_devices_own_switch(tmp_path, db_url) -> None:
    migrate(db_url, "master")
    engine = make_engine(db_url)
    store.register_devices(engine, [("d1", "s1"), ("d2", "s2")])
    assert store.devices_online(engine, "sw1", [_info("d1", {"a": "1"})]) == []
    assert store.devices_online(engine, "sw2", [_info("d2", {"a": "1"})]) == []
    store.set_device_tags(engine, {"d1": ("sw1", {"a": "2", "b": "x"}),
                                   "d2": ("sw1", {"a": "stolen"}),  # d2 is on sw2: no change
                                   "ghost": ("sw1", {"a": "1"}),  # unknown: nothing inserted
                                   "x" * 300: ("sw1", {})})  # cannot be a device id: skipped
    tags = {d["device_id"]: d["tags"] for d in store.list_devices(engine)}
    assert tags == {"d1": {"a": "2", "b": "x"}, "d2": {"a": "1"}}
    store.set_device_tags(engine, {})  # nothing to do: no transaction
    with engine.begin() as c:
        c.execute(devices.update().where(devices.c.device_id == "d1").values(revoked=True))
    store.set_device_tags(engine, {"d1": ("sw1", {"after": "revocation"})})
    assert store.list_devices(engine, ["d1"])[0]["tags"] == {"a": "2", "b": "x"}


# --------------------------------------------------------------------------- the Core's side
def _core_setup(tmp_path):  # type: ignore[no-untyped-def]
    from test_core_counter import _setup

    url = f"sqlite:///{tmp_path / 'm.db'}"
    _setup(url, ["d1", "d2"])
    # the Core's own engine, with a short busy timeout: a writer locked out fails fast (an outage)
    return url, sa.create_engine(url, connect_args={"timeout": 0.3, "check_same_thread": False})


def _tags_of(engine, dev: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return store.list_devices(engine, [dev])[0]["tags"]


def _count_tag_writes(engine) -> list[int]:  # type: ignore[no-untyped-def]
    writes = [0]

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE devices SET tags"):
            writes[0] += 1
    return writes


def test_core_writes_reported_tags_coalesced_and_only_for_its_links_devices(tmp_path) -> None:
    from test_core_containment import Link

    from quanta.core.service import TAGS_WRITE_INTERVAL, Core

    _, engine = _core_setup(tmp_path)
    writes = _count_tag_writes(engine)

    async def run() -> None:
        core = Core(engine, engine, b"s" * 32)
        await core.start()
        link = Link(devices=set())
        await core.handle(link, p.DevicesOnline(devices=[_info("d1"), _info("d2")], seq=1))
        other = Link(name="sw2", devices={"d2"})  # says d2 is its own; the database says sw
        for i in range(2000):  # a flood: what the Core holds per device is its latest
            await core.handle(link, p.DeviceTags(devices={"d1": {"n": str(i)}, "ghost": {"x": "y"}}))
        await core.handle(other, p.DeviceTags(devices={"d2": {"stolen": "yes"}}))
        await asyncio.sleep(TAGS_WRITE_INTERVAL * 3)
        await core.stop()

    import asyncio

    asyncio.run(run())
    assert _tags_of(engine, "d1") == {"n": "1999"} and _tags_of(engine, "d2") == {}
    assert writes[0] <= 2, writes  # 2,001 reports, one statement (two if the flood straddled an interval)


def test_after_an_outage_a_newer_hello_wins_over_a_waiting_report(tmp_path) -> None:
    import asyncio
    import sqlite3

    from test_core_containment import Link

    from quanta.core import service as core_service
    from quanta.core.service import Core

    url, engine = _core_setup(tmp_path)

    async def run() -> None:
        core = Core(engine, engine, b"s" * 32)
        await core.start()
        link = Link()
        await core.handle(link, p.DevicesOnline(devices=[_info("d1"), _info("d2")], seq=1))
        lock = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the master database refuses writers now
        try:
            await core.handle(link, p.DeviceTags(devices={"d1": {"v": "report"}, "d2": {"v": "report"}}))
            deadline = time.monotonic() + 10
            while core._tags_superseded is None:  # the write is under way (and will fail: locked)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # d1 connects again meanwhile: its hello (written once the database is back) is newer
            hello = asyncio.create_task(core.handle(link, p.DevicesOnline(devices=[_info("d1", {"v": "hello"})],
                                                                          seq=2)))
            while core._tags_superseded is not None:  # the write failed; the reports wait
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await hello
        deadline = time.monotonic() + core_service.TAGS_RETRY + 10
        while _tags_of(engine, "d2") != {"v": "report"}:  # d2's report, kept, is written after the outage
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await core.stop()

    asyncio.run(run())
    assert _tags_of(engine, "d1") == {"v": "hello"}
