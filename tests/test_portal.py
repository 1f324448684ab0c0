"""The portal (/Explorer) in a real browser (Debian's Chromium through Playwright) against a real
server with two real agents: log in, ask and watch the counts live, page and aggregate results,
compile errors with line and column, second-person approval (and the self-approval refusal),
devices and switches, and hostile device data rendered as inert text."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, make_server, quanta, wait_until

try:
    from playwright.sync_api import expect
except ImportError:  # the tests that need it skip (or, in CI, fail) in _need_browser
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery staple"
# Device-controlled text that would run script if it were ever parsed as markup.
HOSTILE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_SQL = HOSTILE.replace("'", "''")
QUESTIONER = "quinn"
# An instruction definition with one parameter of each kind (imported in a signed pack).
COUNT_DEF = '''
name = "Portal-ProcessCount"
type = "question"
instruction_set = "Processes"
description = "How many processes match %Pattern% (label %Label%, up to %Limit%, verbose %Verbose%)?"
payload = """
@p = OperatingSystem.GetProcesses();
SELECT COUNT(*) AS Matching, %Label% AS Label FROM @p WHERE Executable LIKE %Pattern%;
"""
[[parameters]]
name = "Pattern"
type = "string"
default = "%"
max_length = 100
pattern = "[%a-z0-9._-]+"
description = "SQL LIKE pattern on the executable path"

[[parameters]]
name = "Label"
type = "string"
allowed = ["alpha", "beta"]
default = "alpha"

[[parameters]]
name = "Limit"
type = "integer"
default = 10
min = 1
max = 100

[[parameters]]
name = "Verbose"
type = "boolean"
default = false

[aggregation]
group_by = ["Label"]

[ttl]
instruction_default = 20
instruction_min = 5
instruction_max = 120
'''


def _need_browser() -> None:
    reason = None
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("QUANTA_CI"):
            pytest.fail(f"portal tests must run in CI: {reason}")
        pytest.skip(f"portal browser tests skipped: {reason}")


@pytest.fixture(scope="module")
def portal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("portal")
    s = make_server(tmp)
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    quanta("user", "add", str(s.root), "--username", "bob", "--role", "Approver", "--email", "bob@example.com",
           "--password-file", str(pw))
    quanta("user", "add", str(s.root), "--username", QUESTIONER, "--role", "Questioner", "--password-file", str(pw))
    s.start()
    try:
        _import_pack(s, tmp)
        for n in ("a1", "a2"):
            s.enroll(n)
            s.start_agent(n)
        s.wait_online({"a1", "a2"})
        creds = dict(line.split("=", 1) for line in (s.root / "admin.credentials").read_text().split())
        s.admin = (creds["username"], creds["password"])  # type: ignore[attr-defined]
        s.base = f"https://localhost:{s.https}"  # type: ignore[attr-defined]
        yield s
    finally:
        s.stop()


def _import_pack(s: Server, tmp: Path) -> None:
    """A signed pack from a trusted publisher, built and imported as in tests/test_definitions.py."""
    from test_definitions import KILL, import_signed_pack

    import_signed_pack(s.root, tmp, {"count": COUNT_DEF, "kill": KILL})


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser tab that fails the test on any page error, console error or CSP violation.

    The page runs under the portal's real Content-Security-Policy (no bypass_csp), so waits use
    locators: a string predicate (wait_for_function) would need eval, which the CSP forbids."""

    def __init__(self, browser, server: Server) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(ignore_https_errors=True, base_url=server.base,  # type: ignore[attr-defined]
                                           viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.dialogs: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def login(self, username: str, password: str) -> None:
        pg = self.page
        pg.goto("/Explorer/")
        pg.fill("#login-username", username)
        pg.fill("#login-password", password)
        pg.click("form.login-form button[type=submit]")
        pg.wait_for_selector("#nav:not([hidden])")
        assert pg.text_content("#user-name") == username

    def ask(self, payload: str) -> int:
        pg = self.page
        pg.goto("/Explorer/#/ask")
        pg.fill("#scale", payload)
        pg.click("#ask-submit")
        pg.wait_for_url("**/Explorer/#/i/*")
        return int(pg.url.split("#/i/")[1].split("?")[0])

    def count(self, state: str) -> int:
        return int(self.page.text_content(f'#counts [data-state="{state}"] .num') or "0")

    def wait_count(self, state: str, n: int, timeout: float = 30) -> None:
        expect(self.page.locator(f'#counts [data-state="{state}"] .num')).to_have_text(str(n), timeout=timeout * 1000)

    def close(self) -> None:
        # Refusals the tests provoke (403, 422) are shown in the page; Chromium also logs each one.
        noise = [e for e in self.errors if not re.search(r"Failed to load resource: .* status of (403|422) ", e)]
        self.context.close()
        assert not noise, noise
        assert not self.dialogs, self.dialogs


@pytest.fixture
def tab(browser, portal_server: Server) -> Iterator[Page]:  # type: ignore[no-untyped-def]
    t = Page(browser, portal_server)
    try:
        yield t
    finally:
        t.close()


def admin_token(s: Server) -> str:
    user, password = s.admin  # type: ignore[attr-defined]
    r = httpx.post(f"{s.base}/Consumer/Authentication/Token", json={"username": user, "password": password},  # type: ignore[attr-defined]
                   verify=False)
    r.raise_for_status()
    return r.json()["token"]


# --------------------------------------------------------------------------- HTTP only
def test_explorer_is_served_with_a_strict_content_security_policy(portal_server: Server) -> None:
    base = portal_server.base  # type: ignore[attr-defined]
    with httpx.Client(verify=False, base_url=base) as c:
        r = c.get("/Explorer", follow_redirects=False)
        assert r.status_code == 308 and r.headers["location"] == "/Explorer/"
        r = c.get("/Explorer/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and r.headers["x-content-type-options"] == "nosniff"
        # no inline script or style, no event-handler attributes, nothing from another origin
        assert "<script>" not in r.text and " on" not in r.text.replace("\n", " ").split("<body", 1)[1].split(">")[0]
        assert "http://" not in r.text and "https://" not in r.text
        js = c.get("/Explorer/static/js/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert js.headers["content-security-policy"] == csp
        assert c.get("/Explorer/static/nope.js").status_code == 404
    # the front end never parses markup from data
    static = Path(__file__).parents[1] / "src" / "quanta" / "portal" / "static"
    for f in static.rglob("*.js"):
        text = f.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{f.name} uses {sink}"
        assert "localStorage" not in text and "document.cookie" not in text, f.name


def test_instruction_list_and_switches_endpoints(portal_server: Server) -> None:
    s = portal_server
    with httpx.Client(verify=False, base_url=s.base) as c:  # type: ignore[attr-defined]
        assert c.get("/Consumer/Instructions").status_code == 401
        assert c.get("/Consumer/Switches").status_code == 401
        c.headers["Authorization"] = f"Bearer {admin_token(s)}"
        r = c.post("/Consumer/Instructions", json={"payload": "SELECT 1 AS One;", "name": "list-me", "instruction_ttl": 30})
        assert r.status_code == 201, r.text
        iid = r.json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/Consumer/Instructions/{iid}").json()["status"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.2)
        page = c.get("/Consumer/Instructions", params={"limit": 5}).json()
        mine = next(x for x in page["items"] if x["id"] == iid)
        assert page["total"] >= 1 and page["items"][0]["id"] >= iid  # newest first
        assert mine["name"] == "list-me" and mine["payload"] == "SELECT 1 AS One;" and mine["kind"] == "question"
        assert mine["states"] == {"success": 2} and mine["targeted"] == 2 and mine["devices"] is None
        assert mine["status"] == "finished"
        # the instruction itself carries its payload, parameters and instruction set (null: raw SCALE)
        one = c.get(f"/Consumer/Instructions/{iid}").json()
        assert one["payload"] == "SELECT 1 AS One;" and one["parameters"] == {} and one["instruction_set"] is None
        assert one["devices"] is None and one["states"] == {"success": 2}
        r = c.post("/Consumer/Instructions", json={"definition": "Portal-ProcessCount", "parameters": {"Limit": 3},
                                                   "devices": ["a2"], "instruction_ttl": 10})
        assert r.status_code == 201, r.text
        one = c.get(f"/Consumer/Instructions/{r.json()['id']}").json()
        assert one["instruction_set"] == "Processes" and one["name"] == "Portal-ProcessCount" and one["devices"] == ["a2"]
        assert one["parameters"] == {"Pattern": "%", "Label": "alpha", "Limit": 3, "Verbose": False}
        assert "OperatingSystem.GetProcesses()" in one["payload"]
        only = c.get("/Consumer/Instructions", params={"status": "pending_approval,rejected"}).json()
        assert all(x["status"] in ("pending_approval", "rejected") for x in only["items"])
        assert iid not in [x["id"] for x in only["items"]]
        assert c.get("/Consumer/Instructions", params={"limit": 0}).status_code == 422
        sw = c.get("/Consumer/Switches").json()
        assert [x["name"] for x in sw] == ["switch-1"]
        assert sw[0]["port"] == s.switch and sw[0]["poke_port"] == s.switch + 1 and sw[0]["enabled"] is True
        assert sw[0]["online_devices"] == 2 and sw[0]["devices"] == 2
        assert "/Consumer/Switches" in c.get("/Consumer/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- browser
def test_ask_watch_live_page_and_aggregate(tab: Page, portal_server: Server, tmp_path: Path) -> None:
    user, password = portal_server.admin  # type: ignore[attr-defined]
    tab.login(user, password)
    pg = tab.page
    # the token is in sessionStorage, never in a cookie
    assert pg.evaluate("Object.keys(sessionStorage)") == ["quanta.explorer.session"]
    assert tab.context.cookies() == []
    iid = tab.ask("@p = OperatingSystem.GetProcesses();\n"
                  "SELECT COUNT(*) AS Processes, 'linux' AS Family FROM @p;")
    tab.wait_count("success", 2)
    assert tab.count("targeted") == 2
    pg.wait_for_selector("#status >> text=Finished")
    # the results redraw once the stream ends; until then a page drawn while answers arrived may
    # show: wait for the final one (its columns), not for the first table of two rows
    expect(pg.locator("#results-table thead th")).to_have_text(["Device", "State", "Processes", "Family", "Error"])
    expect(pg.locator("#results-table tbody tr")).to_have_count(2)
    devices = pg.locator("#results-table tbody td.device").all_text_contents()
    assert sorted(devices) == ["a1", "a2"]
    # paging by result rows (one per device here), linkable
    pg.goto(f"/Explorer/#/i/{iid}?limit=1")
    pg.wait_for_selector(".pager-info >> text=1–1 of 2")
    first = pg.text_content("#results-table tbody td.device")
    pg.click(".pager [data-test=next]")
    pg.wait_for_selector(".pager-info >> text=2–2 of 2")
    second = pg.text_content("#results-table tbody td.device")
    assert {first, second} == {"a1", "a2"}
    assert pg.url.endswith(f"#/i/{iid}?offset=1&limit=1")
    # aggregate: group by a column, with counts
    pg.click("#tab-agg")
    pg.wait_for_selector("#agg-table")
    pg.select_option("#agg-column", "Family")
    pg.wait_for_selector("#agg-table thead th >> text=Family")
    assert pg.locator("#agg-table tbody tr").count() == 1
    assert pg.locator("#agg-table tbody td").all_text_contents()[:3] == ["linux", "2", "2"]
    pg.select_option("#agg-column", "Device state")
    pg.wait_for_selector("#agg-table tbody td >> text=Success")
    # history lists it with its counts
    pg.click("#nav a[data-route=history]")
    row = pg.locator("#history-table tbody tr", has=pg.locator(f"a[href='#/i/{iid}']"))
    assert row.locator("td").nth(3).text_content() == "Finished"
    assert row.locator("td").nth(7).text_content() == "2"
    pg.goto(f"/Explorer/#/i/{iid}")
    pg.wait_for_selector("#results-table")
    shot = tmp_path / "portal-results.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("QUANTA_PORTAL_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["QUANTA_PORTAL_SCREENSHOTS"]) / shot.name)


def test_compile_error_shows_line_and_column(tab: Page, portal_server: Server) -> None:
    user, password = portal_server.admin  # type: ignore[attr-defined]
    tab.login(user, password)
    pg = tab.page
    pg.goto("/Explorer/#/ask")
    pg.fill("#scale", "@p = OperatingSystem.GetProcesses();\nSELECT Name FROM @q;\n")
    pg.click("#ask-submit")
    err = pg.wait_for_selector(".compile-error")
    assert "line 2, column 18" in err.text_content() and "Unknown variable @q" in err.text_content()
    assert pg.text_content(".src-line.offending .txt") == "SELECT Name FROM @q;"
    assert pg.text_content(".gutter .bad") == "2"
    assert pg.url.endswith("#/ask")  # nothing was issued
    # the editor selects the offending text
    sel = pg.evaluate("(() => { const t = document.querySelector('#scale'); return t.value.slice(t.selectionStart, t.selectionEnd); })()")
    assert sel == "@q;"
    # parameters get typed fields; a wrong type is refused before sending
    pg.fill("#scale", "SELECT %Limit% AS L;")
    pg.fill("#param-Limit", "ten")
    pg.select_option("[aria-label='Limit type']", "integer")
    pg.click("#ask-submit")
    pg.wait_for_selector("#ask-status >> text=parameter Limit: enter an integer")


def test_action_needs_a_second_person_and_hostile_data_stays_text(browser, portal_server: Server) -> None:  # type: ignore[no-untyped-def]
    user, password = portal_server.admin  # type: ignore[attr-defined]
    admin = Page(browser, portal_server)
    bob = Page(browser, portal_server)
    try:
        admin.login(user, password)
        iid = admin.ask(f'Tagging.Set(Name: "portal", Value: "{HOSTILE.replace(chr(34), chr(39))}");')
        pg = admin.page
        pg.wait_for_selector("#status >> text=Awaiting approval")
        pg.wait_for_selector("#progress >> text=second person's approval")
        # the requester may not approve: the server's refusal is shown
        pg.click("#nav a[data-route=approvals]")
        card = pg.locator(f"#approval-{iid}")
        card.locator("text=You requested this action").wait_for()
        assert "Tagging.Set" in card.locator("pre").text_content()
        card.locator("[data-test=approve]").click()
        card.locator(".msg-error >> text=cannot approve or reject your own").wait_for()
        # the second person approves with a reason
        bob.login("bob", PASSWORD)
        bp = bob.page
        bp.wait_for_selector("#approvals-badge:not([hidden])")
        bp.click("#nav a[data-route=approvals]")
        bcard = bp.locator(f"#approval-{iid}")
        bcard.locator(".reason").fill("change 42")
        bcard.locator("[data-test=approve]").click()
        bcard.locator(".msg-ok >> text=Approved").wait_for()
        bcard.locator("a >> text=View instruction").click()
        bob.wait_count("success", 2)
        bp.wait_for_selector("#status >> text=Finished")
        bp.wait_for_selector("text=decided by bob")
        expect(bp.locator("#results-table tbody tr")).to_have_count(2)
        expect(bp.locator("#results-table tbody td:nth-child(4)")).to_have_text([HOSTILE.replace('"', "'")] * 2)
        for p in (pg, bp):
            assert p.evaluate("document.querySelectorAll('img').length") == 0
            assert p.evaluate("window.__pwned") is None
    finally:
        admin.close()
        bob.close()


def test_questioner_asks_through_a_definition(tab: Page, portal_server: Server) -> None:
    tab.login(QUESTIONER, PASSWORD)
    pg = tab.page
    pg.goto("/Explorer/#/ask")
    pg.wait_for_selector("#def-select")
    # no raw SCALE for a Questioner: only the definitions
    assert pg.locator("#scale").is_hidden() and pg.locator("#mode-raw").count() == 0
    groups = pg.locator("#def-select optgroup")
    assert groups.evaluate_all("gs => gs.map(g => g.label)") == ["Processes"]
    pg.select_option("#def-select", "Portal-ProcessCount")
    readable = pg.locator("#def-readable")
    expect(readable).to_have_text("How many processes match % (label alpha, up to 10, verbose false)?")
    # a typed field per parameter
    assert pg.get_attribute("#dparam-Limit", "type") == "number"
    assert (pg.get_attribute("#dparam-Limit", "min"), pg.get_attribute("#dparam-Limit", "max")) == ("1", "100")
    assert pg.locator("#dparam-Label option").all_text_contents() == ["alpha", "beta"]
    assert pg.get_attribute("#dparam-Verbose", "type") == "checkbox"
    assert "must match [%a-z0-9._-]+" in pg.text_content("#def-params")
    assert (pg.get_attribute("#def-ttl", "min"), pg.get_attribute("#def-ttl", "max")) == ("5", "120")
    assert pg.input_value("#def-ttl") == "20" and pg.text_content("#def-ttl-bounds") == "5–120 s"
    pg.fill("#dparam-Pattern", "%python%")
    pg.select_option("#dparam-Label", "beta")
    pg.check("#dparam-Verbose")
    pg.fill("#dparam-Limit", "500")
    expect(readable).to_have_text("How many processes match %python% (label beta, up to 500, verbose true)?")
    # the server's refusal of a wrong parameter is shown as it comes
    pg.click("#ask-submit")
    expect(pg.locator("#ask-status .msg-error")).to_have_text("parameter Limit must be <= 100")
    assert pg.get_attribute("#ask-status .msg-error", "data-status") == "422"
    pg.fill("#dparam-Limit", "5")
    pg.fill("#def-ttl", "3")
    pg.click("#ask-submit")
    expect(pg.locator("#ask-status .msg-error")).to_have_text("instruction_ttl must be within 5-120 s for Portal-ProcessCount")
    pg.fill("#def-ttl", "30")
    pg.click("#ask-submit")
    pg.wait_for_url("**/Explorer/#/i/*")
    iid = int(pg.url.split("#/i/")[1].split("?")[0])
    tab.wait_count("success", 2)
    pg.wait_for_selector("#status >> text=Finished")
    expect(pg.locator("#results-table thead th")).to_have_text(["Device", "State", "Matching", "Label", "Error"])
    expect(pg.locator("#results-table tbody tr")).to_have_count(2)
    expect(pg.locator("#results-table tbody td:nth-child(4)")).to_have_text(["beta", "beta"])
    assert all(int(x) >= 1 for x in pg.locator("#results-table tbody td:nth-child(3)").all_text_contents())
    # the instruction page shows the definition, its payload and the parameters it was asked with
    assert pg.text_content("#definition-note") == "Instruction definition Portal-ProcessCount (instruction set Processes)"
    assert "OperatingSystem.GetProcesses()" in pg.text_content("#payload pre")
    assert pg.text_content("#payload-parameters") == (
        'Parameters: {"Pattern":"%python%","Label":"beta","Limit":5,"Verbose":true}')
    # the aggregate is the server's, grouped by the definition's aggregation unless another is chosen
    pg.click("#tab-agg")
    expect(pg.locator("#agg-table thead th")).to_have_text(["Label", "Rows", "Devices", ""])
    assert pg.locator("#agg-table tbody td").all_text_contents()[:3] == ["beta", "2", "2"]
    assert pg.url.endswith(f"#/i/{iid}?view=aggregate&by=Label")
    assert pg.text_content("#agg-summary") == "2 answering devices"
    pg.select_option("#agg-then", "Matching")
    expect(pg.locator("#agg-table thead th")).to_have_text(["Label", "Matching", "Rows", "Devices", ""])
    assert pg.url.endswith("by=Label&by=Matching")
    assert sum(int(x) for x in pg.locator("#agg-table tbody td:nth-child(4)").all_text_contents()) == 2
    pg.click("#agg-default")
    expect(pg.locator("#agg-table thead th")).to_have_text(["Label", "Rows", "Devices", ""])
    pg.select_option("#agg-column", "Device state")
    expect(pg.locator("#agg-table tbody td").first).to_have_text("Success")
    # an action of the set is refused to a Questioner: the server's words
    pg.goto("/Explorer/#/ask")
    pg.select_option("#def-select", "Quanta-KillProcess")
    expect(pg.locator("#ask-submit")).to_have_text("Request action")
    pg.fill("#dparam-Pid", "1")
    pg.click("#ask-submit")
    expect(pg.locator("#ask-status .msg-error")).to_have_text(
        f"{QUESTIONER} may not issue actions of instruction set 'Processes'")
    assert pg.get_attribute("#ask-status .msg-error", "data-status") == "403"
    # and so is a raw payload sent with the same session
    refused = pg.evaluate("""async () => {
        const s = JSON.parse(sessionStorage.getItem("quanta.explorer.session"));
        const r = await fetch("/Consumer/Instructions", {method: "POST", body: JSON.stringify({payload: "SELECT 1 AS One;"}),
            headers: {"Content-Type": "application/json", Authorization: `Bearer ${s.token}`}});
        return [r.status, (await r.json()).detail];
    }""")
    assert refused == [403, "raw SCALE is allowed for Full Administrators only; ask with an instruction definition"]
    assert pg.url.endswith("#/ask")
    _ = iid


def test_hostile_result_values_render_as_text(tab: Page, portal_server: Server) -> None:
    user, password = portal_server.admin  # type: ignore[attr-defined]
    tab.login(user, password)
    pg = tab.page
    iid = tab.ask(f"SELECT '{HOSTILE_SQL}' AS Name, '<script>window.__pwned=2</script>' AS Other;")
    tab.wait_count("success", 2)
    expect(pg.locator("#results-table tbody tr")).to_have_count(2)
    # auto-waiting: the table may be drawn before the last page of answers has been fetched
    expect(pg.locator("#results-table tbody td:nth-child(3)")).to_have_text([HOSTILE, HOSTILE])
    pg.goto(f"/Explorer/#/i/{iid}?view=aggregate&by=Name")
    pg.wait_for_selector("#agg-table")
    assert pg.locator("#agg-table tbody td").first.text_content() == HOSTILE
    pg.click("#nav a[data-route=history]")
    pg.wait_for_selector("#history-table")
    for view in ("results", "aggregate", "history"):
        assert pg.evaluate("document.querySelectorAll('img, tbody script').length") == 0, view
    assert pg.evaluate("window.__pwned") is None
    assert HOSTILE in pg.text_content("#history-table")


def test_devices_and_switches_views(tab: Page, portal_server: Server) -> None:
    from quanta.scale.methods.tagging import save_tags

    s = portal_server
    # a device reports a hostile tag (as Tagging.Set would write it) in its hello
    save_tags(s.root.parent / "agents" / "a1" / "state", {"owner": {"value": HOSTILE, "scopable": False}})
    s.stop_agent("a1")
    s.start_agent("a1")
    with httpx.Client(verify=False, base_url=s.base, headers={"Authorization": f"Bearer {admin_token(s)}"}) as c:  # type: ignore[attr-defined]
        def tagged() -> bool:
            return any(d["device_id"] == "a1" and d["online"] and d["tags"].get("owner") == HOSTILE
                       for d in c.get("/Consumer/Devices").json())
        wait_until(tagged, 30, "a1 online with its new tag", s)
    user, password = s.admin  # type: ignore[attr-defined]
    tab.login(user, password)
    pg = tab.page
    pg.click("#nav a[data-route=devices]")
    pg.wait_for_selector("#devices-table")
    assert pg.text_content("#devices-online") == "2"
    rows = pg.locator("#devices-table tbody tr")
    assert rows.count() == 2
    assert rows.locator("td.device").all_text_contents()[0].startswith("a1")
    assert rows.locator("td:nth-child(2)").all_text_contents() == ["Online", "Online"]
    assert all(os_ for os_ in rows.locator("td:nth-child(3)").all_text_contents())
    assert rows.locator("td:nth-child(4)").all_text_contents() == ["switch-1", "switch-1"]
    assert rows.first.locator(".chip").text_content() == f"owner={HOSTILE}"
    assert pg.evaluate("document.querySelectorAll('img').length") == 0 and pg.evaluate("window.__pwned") is None
    pg.fill("#device-filter", "a2")
    expect(pg.locator("#devices-table tbody tr")).to_have_count(1)
    pg.click("#nav a[data-route=switches]")
    pg.wait_for_selector("#switches-table")
    cells = pg.locator("#switches-table tbody td").all_text_contents()
    assert cells == ["switch-1", "localhost", str(portal_server.switch), str(portal_server.switch + 1), "Enabled", "2", "2"]
    # signing out forgets the token
    pg.click("#logout")
    pg.wait_for_selector("#login-username")
    assert pg.evaluate("sessionStorage.length") == 0


def test_each_role_lands_on_its_home(browser, portal_server: Server) -> None:  # type: ignore[no-untyped-def]
    """An Approver starts on the approvals waiting for them (not on an Ask form they cannot use), a
    Questioner on Ask."""
    bob = Page(browser, portal_server)
    quinn = Page(browser, portal_server)
    try:
        bob.login("bob", PASSWORD)
        bob.page.wait_for_selector("#nav a.active[data-route=approvals]")
        assert not bob.page.locator("#ask-submit").count()
        quinn.login(QUESTIONER, PASSWORD)
        quinn.page.wait_for_selector("#nav a.active[data-route=ask]")
    finally:
        bob.close()
        quinn.close()
