"""The Consumer API's read paths that many viewers share: the progress stream (one poller per
instruction whatever the number of viewers, backing off while nothing changes) and the
definitions list (the caller's rights read once per request). Real app, real SQLite databases."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.pool import NullPool

from quanta.consumer_api.app import ConsumerApi, create_app, hash_password
from quanta.consumer_api.feed import StatusFeed
from quanta.db import make_engine, migrate, store, tables
from quanta.pki import Pki, Signer

PASSWORD = "a long enough password"


def _api(tmp_path: Path) -> ConsumerApi:
    urls = {w: f"sqlite:///{tmp_path / f'{w}.db'}" for w in ("master", "responses")}
    for which, url in urls.items():
        migrate(url, which)
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    master = make_engine(urls["master"])
    responses = make_engine(urls["responses"], poolclass=NullPool)  # each look opens the file anew
    with master.begin() as c:
        for name, role in (("admin", "Full Administrator"), ("nobody", "Nobody")):
            c.execute(tables.users.insert().values(username=name, password_hash=hash_password(PASSWORD), role=role,
                                                   created_at=time.time()))
    return ConsumerApi(master, responses, Signer.from_file(pki.signing_key), core_url="https://127.0.0.1:9",
                       core_token="t")


def _instruction(api: ConsumerApi, status: str, devices: list[str]) -> int:
    now = time.time()
    with api.master.begin() as c:
        iid = c.execute(tables.instructions.insert().values(
            name="q", kind="question", payload="@x = Device.GetSummary();", parameters={}, scope=None, created_by="admin",
            created_at=now, issued_at=now, expires_at=now + 600, status=status, targeted=len(devices))
        ).inserted_primary_key[0]
    store.insert_targets(api.responses, iid, dict.fromkeys(devices, True), now + 3600)
    return int(iid)


def _set_status(api: ConsumerApi, iid: int, status: str) -> None:
    with api.master.begin() as c:
        c.execute(tables.instructions.update().where(tables.instructions.c.id == iid).values(status=status))


def _answer(api: ConsumerApi, iid: int, device: str) -> None:
    store.ingest(api.responses, [dict(instruction_id=iid, device_id=device, state="success", columns=["X"], rows=[[1]],
                                      error=None)])


async def _always() -> bool:
    return True


async def _collect(feed: StatusFeed, iid: int) -> list[dict]:
    return [json.loads(d) async for d in feed.subscribe(iid, _always)]


async def _until(cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_viewers_of_one_instruction_share_one_poller(tmp_path: Path) -> None:
    api = _api(tmp_path)
    feed: StatusFeed = create_app(api).state.feed
    iid = _instruction(api, "active", ["a", "b", "c"])

    async def go() -> list[list[dict]]:
        seen: list[list[dict]] = [[] for _ in range(8)]

        async def view(out: list[dict]) -> None:
            async for d in feed.subscribe(iid, _always):
                out.append(json.loads(d))

        viewers = [asyncio.create_task(view(out)) for out in seen]
        await _until(lambda: feed.watching() == {iid: 8} and all(len(s) == 1 for s in seen))
        started, polls = time.monotonic(), feed.polls
        for n, d in enumerate(("a", "b", "c"), start=2):
            await asyncio.to_thread(_answer, api, iid, d)
            await _until(lambda: all(len(s) == n for s in seen))  # every viewer sees each change
        await asyncio.to_thread(_set_status, api, iid, "finished")
        await asyncio.wait_for(asyncio.gather(*viewers), 10)
        # one poller for eight viewers: at most one look per fast tick, not eight
        assert feed.polls - polls <= (time.monotonic() - started) / feed.fast + 2
        assert feed.watching() == {}  # the poller stopped with the last viewer
        return seen

    seen = asyncio.run(go())
    assert all(s == seen[0] for s in seen)  # every viewer saw the same events
    assert [e["states"] for e in seen[0]] == [{"pending": 3}, {"pending": 2, "success": 1},
                                               {"pending": 1, "success": 2}, {"success": 3}, {"success": 3}]
    assert [e["status"] for e in seen[0]][-2:] == ["active", "finished"]
    assert not {"payload", "parameters", "instruction_set", "devices"} & set(seen[0][0])  # static fields left out


def test_a_quiet_instruction_is_polled_less_and_a_departed_viewer_stops_the_poller(tmp_path: Path) -> None:
    api = _api(tmp_path)
    feed = StatusFeed(create_app(api).state.feed._load, fast=0.1, slow=0.8, check_every=0.2)
    iid = _instruction(api, "active", ["a"])
    here = True

    async def connected() -> bool:
        return here

    async def go() -> None:
        nonlocal here
        got: list[str] = []

        async def view() -> None:
            async for d in feed.subscribe(iid, connected):
                got.append(d)

        viewer = asyncio.create_task(view())
        await asyncio.sleep(3.0)
        # without back-off: 30 looks; with it: 0.1, 0.2, 0.4, then every 0.8 s
        assert 2 <= feed.polls <= 7, feed.polls
        assert len(got) == 1
        await asyncio.to_thread(_answer, api, iid, "a")  # a change is seen within the slowest interval
        await _until(lambda: len(got) == 2, feed.slow + 1)
        here = False  # the viewer's client goes away without a word
        await asyncio.wait_for(viewer, 2)
        assert feed.watching() == {}
        polls = feed.polls
        await asyncio.sleep(1.0)
        assert feed.polls == polls  # nobody watches: nobody polls

    asyncio.run(go())


def test_the_stream_outlives_a_database_outage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = _api(tmp_path)
    feed = StatusFeed(create_app(api).state.feed._load, fast=0.05, slow=0.2)
    iid = _instruction(api, "active", ["a"])
    db = tmp_path / "responses.db"

    async def go() -> list[dict]:
        viewer = asyncio.create_task(_collect(feed, iid))
        await _until(lambda: feed.polls >= 1)
        shutil.move(db, tmp_path / "away.db")  # the next look finds an empty database: no results table
        await _until(lambda: "progress of instruction" in caplog.text)
        polls = feed.polls
        await _until(lambda: feed.polls >= polls + 3)  # it keeps looking, at the slow pace
        assert not viewer.done()
        (tmp_path / "responses.db").unlink(missing_ok=True)
        shutil.move(tmp_path / "away.db", db)
        await asyncio.to_thread(_answer, api, iid, "a")
        await asyncio.to_thread(_set_status, api, iid, "finished")
        return await asyncio.wait_for(viewer, 10)

    with caplog.at_level(logging.INFO, logger="quanta.consumer_api"):
        seen = asyncio.run(go())
    assert seen[-1]["status"] == "finished" and seen[-1]["states"] == {"success": 1}
    assert caplog.text.count("unavailable") == 1  # logged once per outage, not per look
    assert "available again" in caplog.text


def _token(client: TestClient, username: str) -> dict[str, str]:
    r = client.post("/Consumer/Authentication/Token", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_stream_wire_format_and_unknown_instruction(tmp_path: Path) -> None:
    api = _api(tmp_path)
    iid = _instruction(api, "finished", ["a"])
    with TestClient(create_app(api)) as client:
        h = _token(client, "admin")
        r = client.get(f"/Consumer/Instructions/{iid}/Stream", headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = r.text.split("\n\n")
        assert events[-1] == "" and len(events) == 2, r.text
        name, data = events[0].split("\n")
        assert name == "event: status" and json.loads(data.removeprefix("data: "))["status"] == "finished"
        assert client.get("/Consumer/Instructions/999/Stream", headers=h).status_code == 404
        assert client.get(f"/Consumer/Instructions/{iid}/Stream").status_code == 401


def test_definitions_list_reads_the_callers_rights_once(tmp_path: Path) -> None:
    api = _api(tmp_path)
    spec = {"description": "d", "parameters": [], "schema": [], "aggregation": None, "ttl": {}}
    with api.master.begin() as c:
        c.execute(tables.definitions.insert(), [
            dict(name=f"def-{i:02d}", instruction_set=("Processes", "Network", "Software")[i % 3], kind="question",
                 spec=spec, checksum="0" * 64, pack="p", publisher="pub", imported_at=0.0) for i in range(30)])
        c.execute(tables.role_assignments.insert().values(username="nobody", role="Questioner",
                                                          instruction_set="Processes"))
    looks: list[str] = []

    @sa.event.listens_for(api.master, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if "role_assignments" in statement:
            looks.append(statement)

    with TestClient(create_app(api)) as client:
        for user, sets in (("admin", {"Processes", "Network", "Software"}), ("nobody", {"Processes"})):
            h = _token(client, user)
            looks.clear()
            listed = client.get("/Consumer/InstructionDefinitions", headers=h).json()
            assert len(looks) == 1, looks  # not one per row
            assert {d["instruction_set"] for d in listed} == sets
            assert len(listed) == 10 * len(sets)
        looks.clear()
        only = client.get("/Consumer/InstructionDefinitions", params={"instruction_set": "Network"},
                          headers=_token(client, "nobody")).json()
        assert only == []
