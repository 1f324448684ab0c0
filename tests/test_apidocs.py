"""The API reference page works on a server without internet: Swagger UI comes from the web tier
(the swagger-ui-bundle package), under a strict Content-Security-Policy, and renders every operation
in real Chromium with every request to another origin blocked."""

from __future__ import annotations

import httpx
import pytest

from conftest import Server
from test_portal import CHROMIUM, CHROMIUM_ARGS, _need_browser


def test_docs_page_is_served_locally_and_renders_offline(server: Server) -> None:
    base = f"https://localhost:{server.https}"
    ca = str(server.root / "pki" / "ca.crt")
    page = httpx.get(f"{base}/Consumer/docs", verify=ca, timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "cdn" not in page.text.lower() and "<script>" not in page.text  # no CDN, no inline script
    js = httpx.get(f"{base}/Consumer/docs/assets/swagger-ui-bundle.js", verify=ca, timeout=30)
    assert js.status_code == 200 and len(js.content) > 100_000
    # a path outside the bundle directory is not served
    assert httpx.get(f"{base}/Consumer/docs/assets/..%2F..%2F..%2Fquanta%2Fsettings.py", verify=ca,
                     timeout=30).status_code == 404

    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = b.new_context(ignore_https_errors=True)
            elsewhere: list[str] = []

            def offline(route) -> None:  # type: ignore[no-untyped-def]
                if route.request.url.startswith(base):
                    route.continue_()
                else:  # as on a server without internet
                    elsewhere.append(route.request.url)
                    route.abort()

            ctx.route("**/*", offline)
            tab = ctx.new_page()
            problems: list[str] = []
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            tab.goto(f"{base}/Consumer/docs")
            try:
                tab.locator(".opblock-summary-path").first.wait_for(timeout=30_000)
            except Exception:
                raise AssertionError(f"Swagger UI did not render: {problems} {elsewhere}") from None
            paths = set(tab.locator(".opblock-summary-path").evaluate_all("es => es.map(e => e.dataset.path)"))
            assert "/Consumer/Instructions/{instruction_id}/Responses" in paths and len(paths) >= 15, paths
            assert elsewhere == [] and problems == [], (elsewhere, problems)
        finally:
            b.close()


def test_docs_assets_need_no_token_but_the_api_does(server: Server) -> None:
    base = f"https://localhost:{server.https}"
    ca = str(server.root / "pki" / "ca.crt")
    assert httpx.get(f"{base}/Consumer/docs/init.js", verify=ca, timeout=30).status_code == 200
    assert httpx.get(f"{base}/Consumer/Instructions", verify=ca, timeout=30).status_code == 401


pytestmark = pytest.mark.slow
