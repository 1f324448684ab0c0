"""The portal's management-groups, device, history-search pages, live badges and layouts, in a real
browser (Debian's Chromium through Playwright, under the real Content-Security-Policy) against a
real server over TLS with two real agents (test_portal's fixtures, reused): a Group Administrator
creates, edits and deletes a group's rule (audited as them) and a Viewer has no such page; a
device's page shows what it reports, what the server assigns, its groups and its instructions; the
history search is done by the server and kept in the fragment; nav badges and an instruction's
status follow live; every main page at 800 and 1600 px wide is screenshotted and its layout
checked (no horizontal overflow, sign-out visible, tables scroll inside their box, ids on one line,
the wide screen used)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server

from test_portal import HOSTILE, PASSWORD, QUESTIONER, Page, admin_token, browser, portal_server  # noqa: F401  (fixtures)

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow

GROUP_ADMIN = "gina"
VIEWER = "vera"


@pytest.fixture(scope="module")
def http(portal_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=portal_server.base, verify=False, timeout=30,  # type: ignore[attr-defined]
                      headers={"Authorization": f"Bearer {admin_token(portal_server)}"}) as c:
        for name, role in ((GROUP_ADMIN, "Group Administrator"), (VIEWER, "Viewer")):
            r = c.post("/Consumer/Users", json={"username": name, "password": PASSWORD, "role": role})
            assert r.status_code in (201, 409), r.text
        yield c


def _issue(c: httpx.Client, payload: str, name: str, **extra: Any) -> int:
    r = c.post("/Consumer/Instructions", json={"payload": payload, "name": name, "instruction_ttl": 30, **extra})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _finished(c: httpx.Client, iid: int) -> None:
    deadline = time.monotonic() + 40
    while c.get(f"/Consumer/Instructions/{iid}").json()["status"] != "finished":
        assert time.monotonic() < deadline, f"instruction {iid} did not finish"
        time.sleep(0.2)


@pytest.fixture
def page_of(browser, portal_server: Server) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    tabs: list[Page] = []

    def open_as(user: str, password: str = PASSWORD) -> Page:
        t = Page(browser, portal_server)
        tabs.append(t)
        t.login(user, password)
        return t
    yield open_as
    for t in tabs:
        t.close()


# ---------------------------------------------------------------- management groups
def test_a_group_administrator_creates_edits_and_deletes_a_rule(page_of, http: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    pg = page_of(GROUP_ADMIN).page
    pg.click("#nav a[data-route=groups]")
    pg.wait_for_selector("#group-editor")
    assert pg.locator("#nav a[data-route=users]").count() == 0  # not theirs
    pg.fill("#group-name", "Paris web")
    pg.fill("#group-os", "*linux*")
    pg.fill("#group-tags", "site=paris\nrole = web")
    pg.fill("#group-attributes", "owner=ops")
    pg.click("#group-save")
    pg.wait_for_selector("#groups-status >> text=Saved Paris web.")
    row = pg.locator("#groups-table tbody tr[data-group='Paris web']")
    expect(row.locator(".chip")).to_have_text(["os ~ *linux*", "tag site=paris", "tag role=web", "attr owner=ops"])
    expect(row.locator("td.members")).to_have_text("none")
    # edit: the form is filled with the rule, the name fixed
    row.locator("[data-test=edit]").click()
    expect(pg.locator("#group-name")).to_be_disabled()
    expect(pg.locator("#group-tags")).to_have_value("site=paris\nrole=web")
    pg.fill("#group-tags", "site=lyon")
    pg.fill("#group-attributes", "")
    pg.click("#group-save")
    pg.wait_for_selector("#groups-status >> text=Saved Paris web.")
    expect(row.locator(".chip")).to_have_text(["os ~ *linux*", "tag site=lyon"])
    # a bad line is refused in the page, naming it; nothing is sent
    row.locator("[data-test=edit]").click()
    pg.fill("#group-tags", "no equals sign")
    pg.click("#group-save")
    pg.wait_for_selector("#groups-status .msg-error >> text=Tags: \"no equals sign\" is not NAME=VALUE")
    # a name the server refuses: its answer is shown
    pg.click("#group-editor .btn-link")  # cancel the edit
    pg.fill("#group-name", "-bad")
    pg.click("#group-save")
    pg.wait_for_selector("#groups-status .msg-error >> text=a group name is")
    # delete: two clicks, no dialog
    row.locator("[data-test=delete]").click()
    expect(row.locator("[data-test=delete]")).to_have_text("Click again to delete")
    row.locator("[data-test=delete]").click()
    pg.wait_for_selector("#groups-status >> text=Deleted Paris web.")
    expect(row).to_have_count(0)
    # every change audited as the Group Administrator, with the rule before and after
    items = http.get("/Consumer/Audit", params={"object": "Paris web", "limit": 10}).json()["items"]
    assert [(e["action"], e["actor"]) for e in items] == [
        ("group_delete", GROUP_ADMIN), ("group_set", GROUP_ADMIN), ("group_set", GROUP_ADMIN)]
    assert items[2]["after"] == {"os_like": "*linux*", "tags": {"site": "paris", "role": "web"},
                                 "attributes": {"owner": "ops"}}


def test_a_viewer_and_a_questioner_have_no_groups_page(page_of, http: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    for user in (VIEWER, QUESTIONER):
        pg = page_of(user).page
        assert pg.locator("#nav a[data-route=groups]").count() == 0
        pg.goto("/Explorer/#/groups")
        pg.wait_for_selector("#main .msg-error >> text=There is no such page.")


# ---------------------------------------------------------------- one device
def test_device_page_shows_the_device_and_its_instructions_live(page_of, http: httpx.Client,  # type: ignore[no-untyped-def]
                                                                portal_server: Server) -> None:
    http.put("/Consumer/Devices/a1/Attributes", json={"site": "paris"}).raise_for_status()
    http.put("/Consumer/ManagementGroups/pages-paris", json={"attributes": {"site": "paris"}}).raise_for_status()
    first = _issue(http, "SELECT 1 AS One;", "device-page-one", devices=["a1"])
    _finished(http, first)
    admin = page_of(*portal_server.admin)  # type: ignore[attr-defined]
    pg = admin.page
    pg.click("#nav a[data-route=devices]")
    pg.locator("#devices-table tbody tr[data-device=a1] td").nth(2).click()  # the row, not only the link
    pg.wait_for_url("**/#/d/a1")
    expect(pg.locator("#nav a.active")).to_have_attribute("data-route", "devices")
    expect(pg.locator("#device-name")).to_have_text("a1")
    expect(pg.locator("#device-online")).to_have_text("Online")
    expect(pg.locator("#device-address")).not_to_have_text("—")
    expect(pg.locator("#device-attributes .chip")).to_have_text(["site=paris"])
    expect(pg.locator("#device-groups")).to_contain_text("pages-paris")
    api = http.get("/Consumer/Devices/a1").json()
    assert pg.text_content("#device-address") == api["address"] and api["address"]
    assert api["os"] and api["os"] in pg.text_content("#device-facts")
    row = pg.locator(f"#device-instructions-table tbody tr[data-id='{first}']")
    expect(row.locator("td.status")).to_have_text("Finished")
    expect(row.locator("td.state")).to_have_text("Success")
    # a new instruction for this device shows up on the open page (polled), finished in the end
    second = _issue(http, "SELECT 2 AS Two;", "device-page-two", devices=["a1"])
    live = pg.locator(f"#device-instructions-table tbody tr[data-id='{second}']")
    expect(live.locator("td.state")).to_have_text("Success", timeout=45_000)
    assert pg.locator("#device-instructions-table tbody tr").first.get_attribute("data-id") == str(second)
    # attributes: set here by a Full Administrator; the device's groups follow
    pg.fill("#attributes-edit", "site=lyon\nowner=ops")
    pg.click("#attributes-save")
    pg.wait_for_selector("#device-status >> text=Attributes saved.")
    expect(pg.locator("#device-attributes .chip")).to_have_text(["owner=ops", "site=lyon"])
    expect(pg.locator("#device-groups")).not_to_contain_text("pages-paris")
    assert http.get("/Consumer/Devices/a1").json()["attributes"] == {"owner": "ops", "site": "lyon"}
    # a hostile attribute value is shown as text, never parsed as markup
    http.put("/Consumer/Devices/a1/Attributes", json={"note": HOSTILE}).raise_for_status()
    pg.reload()
    expect(pg.locator("#device-attributes")).to_contain_text(f"note={HOSTILE}")
    assert pg.evaluate("document.querySelectorAll('#main img').length") == 0 and pg.evaluate("window.__pwned") is None
    http.put("/Consumer/Devices/a1/Attributes", json={"note": None}).raise_for_status()
    # a device that does not exist (or is not one of the caller's): the API's 404, shown
    pg.goto("/Explorer/#/d/no-such-device")
    pg.wait_for_selector("#main .msg-error >> text=device no-such-device not found")
    admin.errors[:] = [e for e in admin.errors if "status of 404" not in e]


# ---------------------------------------------------------------- history search
def test_history_search_is_in_the_fragment_and_done_by_the_server(page_of, http: httpx.Client,  # type: ignore[no-untyped-def]
                                                                  portal_server: Server) -> None:
    mark = f"hist-{time.time_ns()}"
    mine = [_issue(http, "SELECT 1 AS One;", f"{mark}-disk"), _issue(http, "SELECT 1 AS One;", f"{mark}-cpu")]
    for i in mine:
        _finished(http, i)
    pg = page_of(*portal_server.admin).page  # type: ignore[attr-defined]
    pg.click("#nav a[data-route=history]")
    pg.fill("#history-name", f"{mark}-DISK")
    pg.select_option("#history-status-filter", "finished")
    pg.fill("#history-user", portal_server.admin[0])  # type: ignore[attr-defined]
    pg.click("#history-go")
    expect(pg.locator("#history-table tbody tr")).to_have_count(1)
    assert pg.locator("#history-table tbody tr").get_attribute("data-id") == str(mine[0])
    expect(pg.locator("#history-count")).to_have_text("1 instruction")
    url = pg.url
    assert f"name={mark}-DISK" in url and "status=finished" in url and f"user={portal_server.admin[0]}" in url  # type: ignore[attr-defined]
    # the link opens the same search, its fields filled
    pg.goto("/Explorer/#/ask")
    pg.goto(url)
    expect(pg.locator("#history-name")).to_have_value(f"{mark}-DISK")
    expect(pg.locator("#history-status-filter")).to_have_value("finished")
    expect(pg.locator("#history-table tbody tr")).to_have_count(1)
    # nobody else asked it; a time range in the past has none
    pg.fill("#history-user", QUESTIONER)
    pg.click("#history-go")
    pg.wait_for_selector("#history-results >> text=No instruction matches this search.")
    pg.fill("#history-user", "")
    pg.fill("#history-name", mark)
    pg.fill("#history-to", "2001-01-01T00:00")
    pg.click("#history-go")
    pg.wait_for_selector("#history-results >> text=No instruction matches this search.")
    pg.fill("#history-to", "")
    pg.fill("#history-from", "2001-01-01T00:00")
    pg.click("#history-go")
    expect(pg.locator("#history-table tbody tr")).to_have_count(2)
    # a hand-edited fragment with junk in it: ignored, not sent
    pg.goto("/Explorer/#/history?status=bogus&from=yesterday&offset=-4")
    expect(pg.locator("#history-status-filter")).to_have_value("")
    expect(pg.locator("#history-from")).to_have_value("")
    pg.wait_for_selector("#history-table")
    pg.click("#history-clear")
    expect(pg).to_have_url(re.compile(r"#/history$"))


# ---------------------------------------------------------------- live badges and status
def test_badges_and_an_instructions_status_follow_live(page_of, http: httpx.Client,  # type: ignore[no-untyped-def]
                                                       portal_server: Server) -> None:
    bob = page_of("bob").page  # an Approver: lands on Approvals
    bob.wait_for_selector("#nav a.active[data-route=approvals]")
    bob.wait_for_selector("#main h1 >> text=Approvals")
    admin = page_of(*portal_server.admin).page  # type: ignore[attr-defined]
    admin.click("#nav a[data-route=history]")
    admin.wait_for_selector("#history-results > *")
    before = http.get("/Consumer/Instructions", params={"status": "pending_approval", "limit": 1}).json()["total"]
    # an action waits for approval: the Approver's badge counts it and its card appears, no reload
    action = _issue(http, 'Tagging.Set(Name: "live", Value: "1");', "live-action")
    expect(bob.locator("#approvals-badge")).to_have_text(str(before + 1), timeout=40_000)
    live_card = bob.locator(f"#approval-{action}")
    expect(live_card.locator("[data-test=approve]")).to_be_visible(timeout=40_000)
    # cancelled by its requester meanwhile: the open card says so, its buttons gone
    http.post(f"/Consumer/Instructions/{action}/Cancel").raise_for_status()
    expect(live_card.locator(".approval-badge")).to_have_text("Cancelled", timeout=40_000)
    expect(live_card.locator("[data-test=approve]")).to_have_count(0)
    expect(live_card.locator(".decision-status")).to_contain_text(f"Cancelled by {portal_server.admin[0]}")  # type: ignore[attr-defined]
    if before == 0:
        expect(bob.locator("#approvals-badge")).to_be_hidden(timeout=40_000)
    else:
        expect(bob.locator("#approvals-badge")).to_have_text(str(before), timeout=40_000)
    # a question that stays in progress (a2 is offline) until its 8 s window ends: the running
    # badge shows it and its history row turns Finished without a reload
    portal_server.stop_agent("a2")
    try:
        wait = time.monotonic() + 30
        while "a2" in portal_server.online():
            assert time.monotonic() < wait
            time.sleep(0.3)
        iid = _issue(http, "SELECT 1 AS One;", "live-running", instruction_ttl=8)
        assert http.get(f"/Consumer/Instructions/{iid}").json()["status"] == "active"
        expect(admin.locator("#running-badge")).to_be_visible(timeout=40_000)
        admin.click("#history-clear")  # the list again, with the new row
        row = admin.locator(f"#history-table tbody tr[data-id='{iid}'] td.status")
        expect(row).to_have_text("In progress")
        expect(row).to_have_text("Finished", timeout=40_000)
        expect(admin.locator("#running-badge")).to_be_hidden(timeout=40_000)
    finally:
        portal_server.start_agent("a2")
        portal_server.wait_online({"a1", "a2"}, timeout=60)


# ---------------------------------------------------------------- layouts from 800 px to wide
LAYOUT_CHECK = """() => {
  const vw = window.innerWidth;
  const box = (el) => el.getBoundingClientRect();
  const out = { vw, scroll: document.documentElement.scrollWidth, bodyScroll: document.body.scrollWidth,
                outside: [], wraps: [], main: box(document.getElementById('main')).width };
  const logout = document.getElementById('logout');
  const lb = box(logout);
  out.logout = { left: lb.left, right: lb.right, top: lb.top, bottom: lb.bottom,
                 visible: lb.width > 0 && lb.height > 0 && getComputedStyle(logout).visibility !== 'hidden' };
  out.logoutHit = document.elementFromPoint(lb.left + lb.width / 2, lb.top + lb.height / 2) === logout;
  for (const el of document.querySelectorAll('.topbar, .topbar .brand, .userbox, .card, .table-wrap, .page-head, .toolbar, .pager')) {
    const b = box(el);
    if (b.width > 0 && (b.left < -0.5 || b.right > vw + 0.5)) out.outside.push(`${el.tagName}.${el.className} ${b.left}-${b.right}`);
  }
  out.wrapsScroll = [...document.querySelectorAll('.table-wrap')].map((w) => ({
    overflow: getComputedStyle(w).overflowX, inner: w.scrollWidth, outer: w.clientWidth }));
  for (const el of document.querySelectorAll('td.id, td.device')) {
    const text = el.firstChild;  // the id or name itself (a line under it, e.g. an e-mail, is apart)
    if (!text) continue;
    const range = document.createRange();
    range.selectNodeContents(text.nodeType === Node.TEXT_NODE ? el : text);
    if (text.nodeType === Node.TEXT_NODE) range.setEnd(text, text.length);
    const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
    if (getComputedStyle(el).whiteSpace !== 'nowrap' || lines > 1) out.wraps.push(`${text.textContent} (${lines} lines)`);
  }
  return out;
}"""

PAGES = ["ask", "history", "approvals", "devices", "d/a1", "switches", "groups", "users", "audit", "i/{iid}"]


def test_layouts_at_800_and_1600_pixels(page_of, http: httpx.Client, portal_server: Server,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    iid = _issue(http, "@p = OperatingSystem.GetProcesses(); SELECT Executable, ProcessId FROM @p;", "layout")
    _finished(http, iid)
    http.put("/Consumer/ManagementGroups/layout-linux", json={"os_like": "*linux*", "tags": {"site": "paris"}}).raise_for_status()
    pg = page_of(*portal_server.admin).page  # type: ignore[attr-defined]
    shots = tmp_path / "screens"
    shots.mkdir()
    for width in (800, 1600):
        pg.set_viewport_size({"width": width, "height": 900})
        for name in PAGES:
            pg.goto(f"/Explorer/#/{name.format(iid=iid)}")
            pg.wait_for_selector("#main h1")
            pg.wait_for_selector("#main .loading", state="detached")
            if name in ("history", "devices", "switches", "users", "groups", "d/a1", "i/{iid}"):
                pg.wait_for_selector("#main table.data tbody tr")
            shot = shots / f"{name.replace('/', '-').format(iid='instruction')}-{width}.png"
            pg.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000, shot
            m = pg.evaluate(LAYOUT_CHECK)
            where = (name, width)
            assert m["vw"] == width
            assert m["scroll"] <= width and m["bodyScroll"] <= width, (where, m)  # no horizontal overflow
            assert m["outside"] == [], (where, m["outside"])  # every box inside the viewport
            lo = m["logout"]
            assert lo["visible"] and m["logoutHit"] and lo["left"] >= 0 and lo["right"] <= width and lo["top"] >= 0, (where, lo)
            for w in m["wrapsScroll"]:  # a table scrolls inside its box, whatever its width
                assert w["overflow"] in ("auto", "scroll"), (where, w)
            assert m["wraps"] == [], (where, m["wraps"])  # ids and device names on one line
            if width == 1600:
                assert m["main"] >= 1600 - 2 * 8, (where, m["main"])  # the wide screen is used
    pg.set_viewport_size({"width": 800, "height": 900})
    pg.goto("/Explorer/#/history")
    pg.wait_for_selector("#history-table tbody tr")
    wrap = pg.locator("#history-results .table-wrap")
    inner, outer = wrap.evaluate("w => [w.scrollWidth, w.clientWidth]")
    assert inner > outer, (inner, outer)  # eleven columns do not fit in 800 px...
    assert pg.evaluate("document.documentElement.scrollWidth") <= 800  # ...and the page does not widen
    wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")
    assert wrap.evaluate("w => w.scrollLeft") > 0
    assert len(list(shots.glob("*.png"))) == 2 * len(PAGES)
