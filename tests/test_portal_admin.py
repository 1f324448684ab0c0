"""The portal's administration pages in a real browser (Debian's Chromium through Playwright)
under the real Content-Security-Policy, against a real server over TLS: a Full Administrator
creates a user and disables it (its live token fails at once), lifts a login lock, reads and
filters the audit log and downloads it as CSV; sign-out ends the token on the server; a Viewer
sees none of these pages."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, make_server

from test_portal import Page, browser  # noqa: F401  (browser: the module-scoped fixture)

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow

PW = "correct horse battery staple"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = make_server(tmp_path_factory.mktemp("portal-admin"))
    s.start()
    try:
        creds = dict(line.split("=", 1) for line in (s.root / "admin.credentials").read_text().split())
        s.admin = (creds["username"], creds["password"])  # type: ignore[attr-defined]
        s.base = f"https://localhost:{s.https}"  # type: ignore[attr-defined]
        yield s
    finally:
        s.stop()


@pytest.fixture
def http(admin_server: Server) -> Iterator[httpx.Client]:
    ctx = ssl.create_default_context(cafile=admin_server.root / "pki" / "ca.crt")
    with httpx.Client(base_url=admin_server.base, verify=ctx, timeout=30) as c:  # type: ignore[attr-defined]
        yield c


def _token(c: httpx.Client, user: str, password: str) -> str:
    r = c.post("/Consumer/Authentication/Token", json={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def _devices(c: httpx.Client, token: str) -> int:
    return c.get("/Consumer/Devices", headers={"Authorization": f"Bearer {token}"}).status_code


def test_admin_creates_and_disables_a_user_and_sign_out_ends_the_token(browser, admin_server: Server,  # type: ignore[no-untyped-def]
                                                                      http: httpx.Client) -> None:
    tab = Page(browser, admin_server)
    try:
        pg = tab.page
        with pg.expect_response("**/Consumer/Authentication/Token") as signed_in:
            tab.login(*admin_server.admin)  # type: ignore[attr-defined]
        portal_token = signed_in.value.json()["token"]
        expect(pg.locator('#nav a[data-route="users"]')).to_be_visible()
        expect(pg.locator('#nav a[data-route="audit"]')).to_be_visible()
        pg.click('#nav a[data-route="users"]')
        pg.fill("#new-username", "ursula")
        pg.fill("#new-password", PW)
        pg.select_option("#new-role", "Questioner")
        pg.fill("#new-email", "ursula@example.com")
        pg.click("#user-create-submit")
        row = pg.locator('#users-table tr[data-user="ursula"]')
        expect(row.locator('[data-test="state"]')).to_have_text("Enabled")
        expect(pg.locator("#users-status")).to_contain_text("Created ursula")
        assert http.get("/Consumer/Users/ursula", headers={"Authorization": f"Bearer {portal_token}"}).json()["role"] \
            == "Questioner"
        # her live token fails the moment she is disabled
        ursula = _token(http, "ursula", PW)
        assert _devices(http, ursula) == 200
        row.locator('[data-test="disable"]').click()
        expect(row.locator('[data-test="state"]')).to_have_text("Disabled")
        assert _devices(http, ursula) == 401
        # the administrator's own row cannot be disabled or deleted from here
        me = pg.locator(f'#users-table tr[data-user="{admin_server.admin[0]}"]')  # type: ignore[attr-defined]
        expect(me.locator('[data-test="disable"]')).to_be_disabled()
        # a locked sign-in is listed and can be lifted
        for _ in range(5):
            http.post("/Consumer/Authentication/Token", json={"username": "lockme", "password": "wrong password!!"})
        pg.reload()
        lock = pg.locator('#locks-table tr[data-lock="user:lockme"]')
        lock.locator('[data-test="unlock"]').click()
        expect(pg.locator("#no-locks")).to_be_visible()
        # the audit page: filtered to the disable, and the CSV of it
        pg.click('#nav a[data-route="audit"]')
        pg.fill("#audit-action", "user_disable")
        pg.click("#audit-apply")
        expect(pg.locator("#audit-table tbody tr")).to_have_count(1)
        expect(pg.locator("#audit-table .audit-object")).to_have_text("ursula")
        expect(pg.locator("#audit-table .audit-actor")).to_have_text(admin_server.admin[0])  # type: ignore[attr-defined]
        with pg.expect_download() as dl:
            pg.click("#audit-csv")
        text = open(dl.value.path(), encoding="utf-8").read()
        lines = text.strip().splitlines()
        assert lines[0].startswith("id,time,at,actor,source,action,object") and len(lines) == 2, text
        assert ",user_disable,ursula," in lines[1]
        pg.fill("#audit-action", "no-such-action")
        pg.click("#audit-apply")
        expect(pg.locator("#audit-empty")).to_be_visible()
        # sign-out ends the session on the server: the portal's token is refused afterwards
        assert _devices(http, portal_token) == 200
        with pg.expect_response("**/Consumer/Authentication/Logout") as out:
            pg.click("#logout")
        assert out.value.status == 204
        pg.wait_for_selector("form.login-form")
        assert _devices(http, portal_token) == 401
    finally:
        tab.close()


def test_a_viewer_sees_no_administration_page(browser, admin_server: Server, http: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    admin = _token(http, *admin_server.admin)  # type: ignore[attr-defined]
    r = http.post("/Consumer/Users", json={"username": "val", "password": PW, "role": "Viewer"},
                  headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 201, r.text
    tab = Page(browser, admin_server)
    try:
        pg = tab.page
        tab.login("val", PW)
        expect(pg.locator('#nav a[data-route="devices"]')).to_be_visible()
        assert pg.locator('#nav a[data-route="users"]').count() == 0
        assert pg.locator('#nav a[data-route="audit"]').count() == 0
        for route in ("users", "audit"):
            pg.goto(f"/Explorer/#/{route}")
            expect(pg.locator("#main .msg-error")).to_contain_text("no such page")
    finally:
        tab.close()
