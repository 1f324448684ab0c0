"""Issue 12, results: row paging with a total, typed server-side sort and filter, the streamed
Export (CSV safe against formula injection, JSON, NDJSON), and what hostile callers send. In
process against real SQLite stores (the store queries also on PostgreSQL with QUANTA_TEST_PG_URL)."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.pool import NullPool

from quanta.consumer_api.app import ConsumerApi, create_app, hash_password
from quanta.db import make_engine, migrate, store, tables
from quanta.pki import Pki, Signer
from quanta.roles import FULL_ADMIN

PASSWORD = "correct horse battery staple"
HOSTILE = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", 'a,"b"\nc']


def _world(tmp_path: Path) -> tuple[ConsumerApi, int]:
    urls = {w: f"sqlite:///{tmp_path / f'{w}.db'}" for w in ("master", "responses")}
    for which, url in urls.items():
        migrate(url, which)
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    master = make_engine(urls["master"])
    api = ConsumerApi(master, make_engine(urls["responses"], poolclass=NullPool), Signer.from_file(pki.signing_key),
                      core_url="https://127.0.0.1:9", core_token="t")
    with master.begin() as c:
        c.execute(tables.users.insert().values(username="admin", password_hash=hash_password(PASSWORD),
                                               role=FULL_ADMIN, created_at=time.time()))
        iid = c.execute(tables.instructions.insert().values(
            name="q", kind="question", payload="@x = Device.GetSummary();", parameters={}, scope=None,
            status="finished", created_by="admin", created_at=time.time(), targeted=4)).inserted_primary_key[0]
    _fill(api.responses, iid)
    return api, iid


def _fill(engine, iid: int) -> None:  # type: ignore[no-untyped-def]
    store.insert_targets(engine, iid, {"d1": True, "d2": True, "d3": True, "d4": True}, time.time() + 3600)
    store.ingest(engine, [
        dict(instruction_id=iid, device_id="d1", state="success", columns=["Name", "Size"],
             rows=[["b", 10], ["a", 2.5], [HOSTILE[0], None], *[[h, i] for i, h in enumerate(HOSTILE[1:])]], error=None),
        # another layout: the same names, other positions
        dict(instruction_id=iid, device_id="d2", state="success", columns=["Size", "Name"],
             rows=[[100, "c"], [-7, "it's; DROP TABLE results;--"]], error=None),
        dict(instruction_id=iid, device_id="d3", state="error", columns=None, rows=None, error="=cmd|' /C calc'!A0")])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[TestClient, int, dict[str, str]]]:
    api, iid = _world(tmp_path)
    with TestClient(create_app(api)) as client:
        r = client.post("/Consumer/Authentication/Token", json={"username": "admin", "password": PASSWORD})
        yield client, iid, {"Authorization": f"Bearer {r.json()['token']}"}


def _rows(client: TestClient, iid: int, h: dict[str, str], **params: object) -> dict:  # type: ignore[type-arg]
    r = client.get(f"/Consumer/Instructions/{iid}/Responses", params=params, headers=h)  # rows: the default
    assert r.status_code == 200, r.text
    return r.json()


def test_row_paging_has_a_total_and_aligns_every_layout(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    page = _rows(c, iid, h, limit=3)
    assert page["total"] == 9 + 2 + 1 + 1 and page["columns"] == ["Name", "Size"] and len(page["rows"]) == 3
    every = _rows(c, iid, h, limit=100)["rows"]
    by = {(r["device"], r["index"]): r for r in every}
    assert by[("d2", 0)]["cells"] == ["c", 100]  # d2 answered (Size, Name): cells follow the page's columns
    assert by[("d3", None)] == {"device": "d3", "status": "error", "cells": [None, None], "error": "=cmd|' /C calc'!A0",
                                "index": None}
    assert by[("d4", None)]["status"] == "pending"
    assert page["paging"] == "rows" and "items" not in page  # one shape by default: rows
    # the by-device view only when asked for by name (the CLI's): a total of devices
    by_device = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"paging": "device", "limit": 2}, headers=h).json()
    assert [x["device"] for x in by_device["items"]] == ["d1", "d2"] and by_device["total"] == 4
    assert by_device["paging"] == "device" and "rows" not in by_device
    assert by_device["items"][1] == {"device": "d2", "status": "success", "columns": ["Size", "Name"],
                                     "rows": [[100, "c"], [-7, "it's; DROP TABLE results;--"]], "error": None}
    assert [x["device"] for x in c.get(f"/Consumer/Instructions/{iid}/Responses", params={
        "paging": "device", "state": "error"}, headers=h).json()["items"]] == ["d3"]


def test_sort_on_result_columns_device_and_status(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    sizes = [r["cells"][1] for r in _rows(c, iid, h, sort="-Size", limit=100)["rows"]]
    numbers = [s for s in sizes if isinstance(s, (int, float))]
    assert numbers == sorted(numbers, reverse=True) and sizes[-1] is None  # NULLs last
    names = [r["cells"][0] for r in _rows(c, iid, h, sort="Name", status="success", limit=100)["rows"]]
    assert names == sorted(names)
    assert [r["device"] for r in _rows(c, iid, h, sort="-device", limit=100)["rows"]][:2] == ["d4", "d3"]
    assert [r["status"] for r in _rows(c, iid, h, sort=["status", "-Size"], limit=100)["rows"]][0] == "error"


def test_filters_are_typed_and_combined(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    assert [r["cells"][1] for r in _rows(c, iid, h, filter="Size:gt:5")["rows"]] == [10, 100]
    assert [r["cells"][1] for r in _rows(c, iid, h, filter=["Size:ge:0", "Size:lt:10"])["rows"]] == [2.5, 0, 1, 2, 3, 4, 5]
    assert _rows(c, iid, h, filter="Name:eq:c")["total"] == 1
    assert _rows(c, iid, h, filter="Name:contains:DROP TABLE")["total"] == 1
    assert _rows(c, iid, h, filter="Name:contains:%")["total"] == 0  # LIKE wildcards are escaped
    assert _rows(c, iid, h, filter="Name:startswith:_")["total"] == 0
    assert _rows(c, iid, h, filter="Name:eq:a:b")["total"] == 0  # a value may hold colons
    assert _rows(c, iid, h, filter="error:nonempty")["total"] == 1
    assert _rows(c, iid, h, device="D2")["total"] == 2
    assert _rows(c, iid, h, status=["error", "pending"])["total"] == 2
    assert _rows(c, iid, h, filter="status:eq:pending")["total"] == 1


def test_export_csv_is_quoted_and_formula_safe(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    r = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "csv"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f'attachment; filename="instruction-{iid}.csv"'
    table = list(csv.reader(io.StringIO(r.text)))
    assert table[0] == ["device", "status", "Name", "Size", "error"]
    assert len(table) == 1 + 13
    cells = [cell for row in table for cell in row]
    for bad in HOSTILE[:-1]:
        assert bad not in cells and "'" + bad in cells, bad
    assert 'a,"b"\nc' in cells  # commas, quotes and newlines survive the quoting
    assert ["d2", "success", "it's; DROP TABLE results;--", "-7", ""] in table  # a negative number stays a number
    assert ["d3", "error", "", "", "'=cmd|' /C calc'!A0"] in table
    # the same CSV from /Responses?format=csv and Accept: text/csv
    assert c.get(f"/Consumer/Instructions/{iid}/Responses", params={"format": "csv"}, headers=h).text == r.text
    assert c.get(f"/Consumer/Instructions/{iid}/Responses", headers={**h, "Accept": "text/csv"}).text == r.text


def test_export_json_and_ndjson(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    arr = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "json"}, headers=h).json()
    lines = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "ndjson"}, headers=h).text.splitlines()
    assert [json.loads(x) for x in lines] == arr and len(arr) == 13
    assert arr[0] == {"device": "d1", "status": "success", "Name": "b", "Size": 10, "error": None}
    assert list(arr[0]) == ["device", "status", "Name", "Size", "error"]
    assert HOSTILE[0] in [o["Name"] for o in arr]  # JSON is data, not a spreadsheet: unchanged
    sorted_ = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "ndjson", "sort": "-Size",
                                                                   "filter": "Size:gt:5"}, headers=h).text
    assert [json.loads(x)["Size"] for x in sorted_.splitlines()] == [100, 10]


# ---------------------------------------------------------------- hostile
def test_unknown_columns_and_operators_are_422_naming_the_valid_ones(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    base = f"/Consumer/Instructions/{iid}"
    for path, params in ((f"{base}/Responses", {"sort": "-Nope"}),
                         (f"{base}/Responses", {"filter": "Nope:eq:1"}),
                         (f"{base}/Export", {"sort": "Nope"})):
        r = c.get(path, params=params, headers=h)
        assert r.status_code == 422 and "Nope" in r.text and "device, status, error, Name, Size" in r.text, r.text
    for bad in ("Name:like:x", "Name", "Name::x", "status:eq:bogus"):
        assert c.get(f"{base}/Responses", params={"filter": bad}, headers=h).status_code == 422, bad
    assert c.get(f"{base}/Responses", params={"status": "bogus"}, headers=h).status_code == 422
    assert c.get(f"{base}/Responses", params={"state": "bogus"}, headers=h).status_code == 422
    # the by-device view has no sort or filter: a 422 that says where they are
    for params in ({"sort": "Name"}, {"filter": "Name:empty"}, {"device": "d1"}, {"status": "success"}):
        r = c.get(f"{base}/Responses", params={"paging": "device", **params}, headers=h)
        assert r.status_code == 422 and "leave out paging=device" in r.text, (params, r.text)
    assert c.get(f"{base}/Responses", params={"sort": ["Name"] * 5}, headers=h).status_code == 422
    assert c.get(f"{base}/Responses", params={"filter": ["Name:empty"] * 9}, headers=h).status_code == 422


def test_hostile_values_are_bound_not_pasted(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    base = f"/Consumer/Instructions/{iid}"
    for v in ("' OR 1=1 --", "\"; DROP TABLE results; --", "%", "_", "\\", "$[0]", "') UNION SELECT 1 --"):
        assert _rows(c, iid, h, filter=f"Name:eq:{v}")["total"] == 0, v
        assert _rows(c, iid, h, device=v)["total"] == 0, v
    assert _rows(c, iid, h)["total"] == 13  # nothing was dropped
    # 60 KB: httpx refuses a longer query string; the bound is 1,000 characters a value
    for params in ({"filter": "Name:eq:a\x00b"}, {"filter": "Name:eq:" + "x" * 60_000}, {"device": "a\x00"},
                   {"device": "x" * 60_000}, {"sort": "x" * 60_000}):
        r = c.get(f"{base}/Responses", params=params, headers=h)
        assert r.status_code == 422, (params, r.status_code)
    assert _rows(c, iid, h)["total"] == 13


def test_out_of_range_and_bad_formats_are_422_and_hidden_is_404(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    base = f"/Consumer/Instructions/{iid}"
    for params in ({"offset": -1}, {"offset": 2**31}, {"limit": 0}, {"limit": -5}, {"limit": 10_001}, {"limit": "x"},
                   {"limit": 10**30}, {"offset": "1e3"}):
        for paging in ({}, {"paging": "device"}):
            r = c.get(f"{base}/Responses", params={**paging, **params}, headers=h)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", next(iter(params))], (params, r.text)
    for fmt in ("xml", "CSV", "", "csv;drop"):
        assert c.get(f"{base}/Export", params={"format": fmt}, headers=h).status_code == 422, fmt
        assert c.get(f"{base}/Responses", params={"format": fmt}, headers=h).status_code == 422, fmt
    for paging in ("pages", "ROWS", "", "rows;drop", "device\x00"):
        assert c.get(f"{base}/Responses", params={"paging": paging}, headers=h).status_code == 422, paging
    for missing in (999_999, 0):
        r = c.get(f"/Consumer/Instructions/{missing}/Export", headers=h)
        assert r.status_code == 404 and r.json() == {"detail": f"instruction {missing} not found"}
    assert c.get(f"{base}/Export").status_code == 401


def test_pages_past_the_end_the_largest_page_and_pages_that_add_up(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    every = _rows(c, iid, h, limit=10_000)  # the largest page there is
    assert every["total"] == 13 and len(every["rows"]) == 13 and every["limit"] == 10_000
    for params in ({}, {"sort": "-Size"}, {"filter": "Size:ge:0"}, {"status": "success"}, {"sort": "-device"}):
        want = _rows(c, iid, h, limit=100, **params)
        # an offset at or past the end: no rows, the total still right (device order seeks, other orders count)
        for off in (want["total"], want["total"] + 1, 2**31 - 1):
            page = _rows(c, iid, h, offset=off, limit=5, **params)
            assert (page["rows"], page["total"], page["offset"]) == ([], want["total"], off), (params, off)
        # pages of 4 add up to the whole, each row once, in order
        pages = [r for off in range(0, want["total"], 4) for r in _rows(c, iid, h, offset=off, limit=4, **params)["rows"]]
        assert pages == want["rows"], params
    last = _rows(c, iid, h, offset=12, limit=5)
    assert len(last["rows"]) == 1 and last["rows"][0]["device"] == "d4"
    by_device = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"paging": "device", "offset": 4}, headers=h).json()
    assert (by_device["items"], by_device["total"]) == ([], 4)


def test_sort_and_filter_names_are_checked_and_values_literal(world) -> None:  # type: ignore[no-untyped-def]
    c, iid, h = world
    base = f"/Consumer/Instructions/{iid}/Responses"
    for bad in ("Name; DROP TABLE results", "Name --", "(SELECT 1)", "-", "", "--Name", "Name\x00", "Name ",
                "columns", "rows", "state", "device_id", "1", "x" * 5000):
        r = c.get(base, params={"sort": bad}, headers=h)
        assert r.status_code == 422, (bad, r.text)
        assert len(r.text) < 2000, "the 422 cuts what it echoes"
        r = c.get(base, params={"filter": f"{bad}:eq:1"}, headers=h)
        assert r.status_code == 422, (bad, r.text)
    for v in ("*", "?", "%", "%%", "_", "[a-z]", "a*", "\\%"):  # wildcards of any dialect are plain characters
        for op in ("eq", "contains", "startswith"):
            assert _rows(c, iid, h, filter=f"Name:{op}:{v}")["total"] == 0, (op, v)
        assert _rows(c, iid, h, device=v)["total"] == 0, v
    assert _rows(c, iid, h, filter="Name:contains:DROP TABLE")["total"] == 1  # the text is there, and found as text
    assert _rows(c, iid, h, filter="Name:eq:" + "x" * 992)["total"] == 0  # the longest term allowed: 1,000 characters
    r = c.get(base, params={"filter": "Name:eq:" + "x" * 993}, headers=h)
    assert (r.status_code, r.json()) == (422, {"detail": "filter is longer than 1000 characters"})
    assert _rows(c, iid, h)["total"] == 13


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_row_queries_on_every_backend(tmp_path: Path, backend: str) -> None:
    if backend == "postgresql":
        url = os.environ.get("QUANTA_TEST_PG_URL")
        if not url:
            pytest.skip("QUANTA_TEST_PG_URL not set")
    else:
        url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url, "responses")
    engine = make_engine(url)
    iid = 900_000 + int(time.time() * 1000) % 90_000
    with engine.begin() as c:
        c.execute(tables.results.delete().where(tables.results.c.instruction_id == iid))
    _fill(engine, iid)
    layouts = store.result_layouts(engine, iid)
    assert store.result_columns(layouts) == ["Name", "Size"]
    Q, F, S = store.RowQuery, store.RowFilter, store.RowSort
    total, rows = store.page_result_rows(engine, iid, 0, 100, None, layouts, Q(filters=[F("Size", "gt", "5")],
                                                                                sort=[S("Size", True)]))
    assert total == 2 and [(r["device_id"], r["index"]) for r in rows] == [("d2", 0), ("d1", 0)]
    total, rows = store.page_result_rows(engine, iid, 0, 100, ["d3", "d4"], layouts, Q())
    assert total == 2 and [r["row"] for r in rows] == [None, None]
    assert store.page_result_rows(engine, iid, 0, 1, None, layouts, Q(filters=[F("Name", "eq", "' OR 1=1 --")]))[0] == 0
    assert store.page_result_rows(engine, iid, 0, 1, None, layouts, Q(filters=[F("Name", "contains", "drop")]))[0] == 1
    # a deep page in device order starts at the device the offset falls in: the same rows as OFFSET
    for q in (Q(), Q(sort=[S("device")]), Q(sort=[S("device", True)]), Q(states=["success", "error"])):
        every = [(r["device_id"], r["index"]) for r in store.page_result_rows(engine, iid, 0, 100, None, layouts, q)[1]]
        for off in range(0, len(every) + 2):
            total, page = store.page_result_rows(engine, iid, off, 3, None, layouts, q)
            assert total == len(every) and [(r["device_id"], r["index"]) for r in page] == every[off:off + 3], (q, off)
    streamed = list(store.iter_result_rows(engine, iid, None, layouts, Q(sort=[S("device", True)])))
    assert [r["device_id"] for r in streamed][:2] == ["d4", "d3"] and len(streamed) == 13
    assert [r["device_id"] for r in store.iter_results(engine, iid, ["d2"])] == ["d2"]
    with engine.begin() as c:
        c.execute(tables.results.delete().where(tables.results.c.instruction_id == iid))


@contextmanager
def _uvicorn(api: ConsumerApi) -> Iterator[int]:
    """The Consumer API in a real uvicorn on a free loopback port (its port)."""
    import socket
    import threading

    import uvicorn

    from conftest import wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(api), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
        assert thread.is_alive(), "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_10_mb_query_is_refused_and_touches_only_its_own_request(tmp_path: Path) -> None:
    """A real uvicorn: a 10 MB filter value (and a 10 MB device and sort) in the request line is
    refused with a 4xx on its own connection; the next request is answered."""
    import socket

    import httpx

    api, iid = _world(tmp_path)
    with _uvicorn(api) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        token = c.post("/Consumer/Authentication/Token", json={"username": "admin", "password": PASSWORD}).json()["token"]
        for name, value in (("filter", "Name:eq:"), ("device", ""), ("sort", ""), ("filter", "Name:contains:%00")):
            line = (f"GET /Consumer/Instructions/{iid}/Responses?{name}={value}{'x' * 10_000_000} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                try:
                    s.sendall(line)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server may stop reading and answer before the line ends
                answer = b""
                try:
                    while chunk := s.recv(65536):
                        answer += chunk
                except ConnectionResetError:
                    pass
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
            assert status is not None and 400 <= status < 500, (name, answer[:200])
        r = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"limit": 1}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["total"] == 13


def test_a_client_leaving_mid_export_touches_only_its_own_request(tmp_path: Path) -> None:
    """A real uvicorn on loopback: 20 exports abandoned after their first chunk, then the API
    answers, a writer commits, and a full export is whole."""
    import httpx

    api, iid = _world(tmp_path)
    big = [f"m{i:05d}" for i in range(3000)]
    store.insert_targets(api.responses, iid, dict.fromkeys(big, True), time.time() + 3600)
    store.ingest(api.responses, [dict(instruction_id=iid, device_id=d, state="success", columns=["Name", "Size"],
                                      rows=[[f"p{r}", r] for r in range(10)], error=None) for d in big])
    with _uvicorn(api) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            token = c.post("/Consumer/Authentication/Token", json={"username": "admin", "password": PASSWORD}).json()["token"]
            h = {"Authorization": f"Bearer {token}"}
            for _ in range(20):
                with c.stream("GET", f"/Consumer/Instructions/{iid}/Export", params={"format": "csv"}, headers=h) as r:
                    assert r.status_code == 200
                    next(r.iter_raw())
            assert c.get(f"/Consumer/Instructions/{iid}/Responses", params={"limit": 1},
                         headers=h).json()["total"] == 13 + 3000 * 10
            store.ingest(api.responses, [dict(instruction_id=iid, device_id="d4", state="success", columns=["Name"],
                                              rows=[["late"]], error=None)])
            whole = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "csv"}, headers=h).text
            assert len(list(csv.reader(io.StringIO(whole)))) == 1 + 13 + 3000 * 10 and "d4,success,late" in whole
