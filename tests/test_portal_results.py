"""Issue 12, the portal's results grid in real Chromium against a real server: row pages with a
total, sort by clicking a header, the filter box, bytes and times formatted, the state in the
URL's fragment (a shared link shows the same page), and the Export button giving the API's CSV."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, make_server
from test_portal import Page, _need_browser, browser  # noqa: F401  (the module's browser fixture)

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - _need_browser skips with the reason
    expect = None  # type: ignore[assignment]

DEVICES = 250
ROWS = 2  # per device: 500 result rows
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def seed(root: Path, devices: int, rows: int) -> int:
    """An answered instruction written straight into the server's databases (the store's bulk writes)."""
    from quanta.db import make_engine, store, tables

    master, responses = make_engine(f"sqlite:///{root / 'master.db'}"), make_engine(f"sqlite:///{root / 'responses.db'}")
    with master.begin() as c:
        iid = c.execute(tables.instructions.insert().values(
            name="grid", kind="question", payload="@p = OperatingSystem.GetProcesses();", parameters={}, scope=None,
            status="finished", created_by="admin", created_at=time.time(), targeted=devices)).inserted_primary_key[0]
    names = [f"dev-{i:05d}" for i in range(devices)]
    store.insert_targets(responses, iid, dict.fromkeys(names, True), time.time() + 86400)
    for i in range(0, devices, 5000):
        store.ingest(responses, [dict(
            instruction_id=iid, device_id=d, state="success", error=None, columns=["Name", "Memory", "Started"],
            rows=[[f"proc-{r}" if (n + r) % 7 else HOSTILE, 1_048_576 * (n % 100 + r), 1_700_000_000 + n]
                  for r in range(rows)]) for n, d in enumerate(names[i:i + 5000], start=i)])
    master.dispose()
    responses.dispose()
    return int(iid)


@pytest.fixture(scope="module")
def grid_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    _need_browser()
    s = make_server(tmp_path_factory.mktemp("grid"))
    s.start()
    try:
        iid = seed(s.root, DEVICES, ROWS)
        creds = dict(line.split("=", 1) for line in (s.root / "admin.credentials").read_text().split())
        s.admin = (creds["username"], creds["password"])  # type: ignore[attr-defined]
        s.base = f"https://localhost:{s.https}"  # type: ignore[attr-defined]
        yield s, iid
    finally:
        s.stop()


@pytest.fixture
def tab(browser, grid_server) -> Iterator[Page]:  # type: ignore[no-untyped-def]  # noqa: F811
    t = Page(browser, grid_server[0])
    try:
        yield t
    finally:
        t.close()


def _api_csv(s: Server, iid: int, **params: str) -> str:
    user, password = s.admin  # type: ignore[attr-defined]
    with httpx.Client(base_url=s.base, verify=False) as c:  # type: ignore[attr-defined]
        token = c.post("/Consumer/Authentication/Token", json={"username": user, "password": password}).json()["token"]
        r = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "csv", **params},
                  headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.text


def test_grid_pages_sorts_filters_formats_and_exports(tab: Page, grid_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s, iid = grid_server
    tab.login(*s.admin)
    pg = tab.page
    pg.goto(f"/Explorer/#/i/{iid}")
    expect(pg.locator(".pager-info")).to_have_text(f"1–100 of {DEVICES * ROWS}")
    expect(pg.locator("#results-table tbody tr")).to_have_count(100)  # one page in the DOM, not 500 rows
    expect(pg.locator("#results-table thead th")).to_have_text(["Device", "State", "Name", "Memory", "Started", "Error"])
    first = pg.locator("#results-table tbody tr").nth(1).locator("td")  # dev-00000's second row: 1 MiB
    expect(first.nth(3)).to_have_text("1.00 MiB")  # bytes
    assert first.nth(3).get_attribute("title") == "1048576"
    assert "1700000000" not in (first.nth(4).text_content() or "") and first.nth(4).get_attribute("title") == "1700000000"
    assert pg.evaluate("window.__pwned") is None and HOSTILE in pg.locator("#results-table").inner_text()
    # page turn: the next 100 rows, the offset in the URL
    pg.click(".pager [data-test=next]")
    expect(pg.locator(".pager-info")).to_have_text(f"101–200 of {DEVICES * ROWS}")
    assert pg.url.endswith(f"#/i/{iid}?offset=100")
    # sort by clicking a header: ascending, then descending
    pg.click("#results-table th[data-sort=Memory]")
    expect(pg.locator("#results-table th[data-sort=Memory]")).to_have_attribute("aria-sort", "ascending")
    pg.click("#results-table th[data-sort=Memory]")
    expect(pg.locator("#results-table th[data-sort=Memory]")).to_have_attribute("aria-sort", "descending")
    expect(pg.locator("#results-table tbody tr").first.locator("td").nth(3)).to_have_text("100.0 MiB")  # 99 + 1 MiB
    assert pg.url.endswith(f"#/i/{iid}?sort=-Memory")
    # the filter box: a column filter, then a device filter
    pg.fill("#results-filter", "Name:eq:proc-1")
    pg.press("#results-filter", "Enter")
    matching = sum(1 for n in range(DEVICES) if (n + 1) % 7)
    expect(pg.locator(".pager-info")).to_have_text(f"1–100 of {matching}")
    assert "filter=Name%3Aeq%3Aproc-1" in pg.url and "sort=-Memory" in pg.url
    # a shared link shows the same page
    link = pg.url
    pg.goto("/Explorer/#/history")
    pg.goto(link)
    expect(pg.locator(".pager-info")).to_have_text(f"1–100 of {matching}")
    expect(pg.locator("#results-filter")).to_have_value("Name:eq:proc-1")
    expect(pg.locator("#results-table th[data-sort=Memory]")).to_have_attribute("aria-sort", "descending")
    # Export: the button's file is the API's CSV for the same sort and filter
    with pg.expect_download() as dl:
        pg.click("#export-csv")
    path = tmp_path / "grid.csv"
    dl.value.save_as(path)
    assert dl.value.suggested_filename == f"instruction-{iid}.csv"
    exported = path.read_bytes().decode()
    assert exported == _api_csv(s, iid, sort="-Memory", filter="Name:eq:proc-1")
    assert exported.count("\r\n") == matching + 1
    pg.fill("#results-filter", "dev-0024")
    pg.press("#results-filter", "Enter")
    expect(pg.locator(".pager-info")).to_have_text("1–20 of 20")  # dev-00240 .. dev-00249, 2 rows each
    assert "device=dev-0024" in pg.url


def test_a_link_with_an_unknown_column_says_so_and_still_shows_rows(tab: Page, grid_server) -> None:  # type: ignore[no-untyped-def]
    s, iid = grid_server
    tab.login(*s.admin)
    pg = tab.page
    pg.goto(f"/Explorer/#/i/{iid}?sort=Nope&filter=Nope:eq:1")
    expect(pg.locator("#results .msg-error")).to_contain_text("Nope")
    expect(pg.locator(".pager-info")).to_have_text(f"1–100 of {DEVICES * ROWS}")


def test_cli_export_is_the_apis_csv(grid_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same CSV through the CLI (``quanta export``, which streams the Export route) as through the API
    and, above, the portal's button."""
    from conftest import quanta

    s, iid = grid_server
    out = tmp_path / "cli.csv"
    quanta("export", str(s.root), str(iid), "--format", "csv", "-o", str(out))
    assert out.read_bytes().decode() == _api_csv(s, iid)
    assert out.read_bytes().decode().count("\r\n") == DEVICES * ROWS + 1
