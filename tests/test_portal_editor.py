"""The Ask page's SCALE editor in real Chromium (issue 12): typed text is highlighted by token
kind over the textarea (aligned with it), the method browser (fed by GET /Consumer/Methods)
searches and inserts a call template at the cursor and marks actions, the inline check (POST
/Consumer/Scale/Check, the real compiler) shows an error where the compiler puts it, a markup
payload stays text, and the layout holds at 800 px. A real server over TLS; no agent is needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import Server, make_server, quanta
from quanta.scale import ScaleError
from quanta.scale.cli import check_source
from quanta.settings import DataDir
from test_portal import HOSTILE, PASSWORD, QUESTIONER, Page, browser  # noqa: F401  (browser: the module-scoped fixture)

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("portal-editor")
    s = make_server(tmp)
    (tmp / "pw").write_text(PASSWORD)
    quanta("user", "add", str(s.root), "--username", QUESTIONER, "--role", "Questioner", "--password-file", str(tmp / "pw"))
    s.start()
    s.base = f"https://localhost:{s.https}"  # type: ignore[attr-defined]
    creds = dict(line.split("=", 1) for line in DataDir(s.root).admin_credentials.read_text().split())
    s.admin = (creds["username"], creds["password"])  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def tab(browser, server: Server) -> Iterator[Page]:  # type: ignore[no-untyped-def]
    t = Page(browser, server)
    try:
        t.login(*server.admin)  # type: ignore[attr-defined]
        t.page.goto("/Explorer/#/ask")
        t.page.wait_for_selector("#method-list .mb-item")
        yield t
    finally:
        t.close()


def _replace(tab: Page, text: str) -> None:
    """Type ``text`` into the editor as a user would (key by key), replacing what is there."""
    pg = tab.page
    pg.click("#scale")
    pg.keyboard.press("Control+A")
    pg.keyboard.press("Delete")
    pg.keyboard.type(text)


def _compile_error(text: str) -> ScaleError:
    try:
        check_source(text)
    except ScaleError as e:
        return e
    raise AssertionError(f"{text!r} compiles")


def test_typing_shows_highlighted_tokens_aligned_with_the_text(tab: Page) -> None:
    pg = tab.page
    text = ('// running processes\n@p = OperatingSystem.GetProcesses();\n'
            'FOREACH @r IN @p DO @x = Tagging.Check(Name: "a-tag", Value: @r.Name); DONE;\n'
            'SELECT Name, COUNT(*) AS N FROM @p WHERE MemoryBytes > 1024 AND Name LIKE %Pattern% GROUP BY Name;\n'
            'SELECT ExecutableName FROM $Process_Live;\n')
    _replace(tab, text)
    hl = pg.locator(".scale-hl")
    expect(hl).to_have_text(text + "\n ")  # every character shown, in order
    assert pg.locator(".scale-hl .tk-com").first.text_content() == "// running processes"
    assert pg.locator(".scale-hl .tk-call").all_text_contents() == ["OperatingSystem.GetProcesses", "Tagging.Check"]
    assert pg.locator(".scale-hl .tk-kw").all_text_contents() == ["FOREACH", "IN", "DO", "DONE"]
    assert pg.locator(".scale-hl .tk-var").all_text_contents() == ["@p", "@r", "@p", "@x", "@r.Name", "@p"]
    assert pg.locator(".scale-hl .tk-str").all_text_contents() == ['"a-tag"']
    assert pg.locator(".scale-hl .tk-num").all_text_contents() == ["1024"]
    assert pg.locator(".scale-hl .tk-param").all_text_contents() == ["%Pattern%"]
    assert pg.locator(".scale-hl .tk-table").all_text_contents() == ["$Process_Live"]
    assert {"SELECT", "FROM", "WHERE", "AND", "LIKE", "GROUP", "BY", "AS"} <= set(pg.locator(".scale-hl .tk-sql").all_text_contents())
    # the copy lies exactly under the textarea, in the same font and metrics, and the typed text itself is transparent
    styles = ["fontFamily", "fontSize", "lineHeight", "paddingTop", "paddingLeft", "tabSize", "whiteSpace"]
    get = "(el, names) => { const s = getComputedStyle(el); return Object.fromEntries(names.map((n) => [n, s[n]])); }"
    assert pg.locator(".scale-hl").evaluate(get, styles) == pg.locator("#scale").evaluate(get, styles)
    assert pg.locator(".scale-hl").bounding_box() == pg.locator("#scale").bounding_box()
    assert pg.locator("#scale").evaluate("el => getComputedStyle(el).color") == "rgba(0, 0, 0, 0)"
    # the real compiler found nothing wrong; scrolling the textarea scrolls the copy
    expect(pg.locator("#scale-check")).to_have_attribute("data-state", "ok")
    expect(pg.locator("#scale-check")).to_contain_text("A question")
    _replace(tab, "\n".join(f"@v{i} = {i};" for i in range(60)))
    pg.locator("#scale").evaluate("el => { el.scrollTop = 400; el.dispatchEvent(new Event('scroll')); }")
    assert pg.locator(".scale-hl").evaluate("el => el.scrollTop") == pg.locator("#scale").evaluate("el => el.scrollTop") > 0


def test_method_browser_searches_inserts_at_the_cursor_and_marks_actions(tab: Page) -> None:
    pg = tab.page
    # every method of the registry is listed
    from quanta.scale.cli import methods_json

    listed = pg.locator("#method-list .mb-item").evaluate_all("els => els.map((e) => e.dataset.method)")
    assert listed == [f"{m['module']}.{m['name']}" for m in methods_json()]
    _replace(tab, "")
    pg.fill("#method-search", "GetProcesses")
    item = pg.locator('.mb-item[data-method="OperatingSystem.GetProcesses"]')
    expect(item).to_be_visible()
    expect(pg.locator('.mb-item[data-method="Device.GetSummary"]')).to_be_hidden()
    assert pg.locator("#method-list .mb-item:visible").count() == 1
    item.click()
    # on an empty line: a statement; the info pane shows its columns
    expect(pg.locator("#scale")).to_have_value("@processes = OperatingSystem.GetProcesses();")
    expect(pg.locator("#method-info")).to_contain_text("OperatingSystem.GetProcesses")
    expect(pg.locator("#method-info .mb-columns")).to_contain_text("ProcessId")
    expect(pg.locator(".scale-hl .tk-call")).to_have_text("OperatingSystem.GetProcesses")
    # within a line: the bare call, at the cursor
    _replace(tab, "@p = ;\nSELECT * FROM @p;")
    pg.keyboard.press("Control+Home")
    for _ in range(5):
        pg.keyboard.press("ArrowRight")
    item.click()
    expect(pg.locator("#scale")).to_have_value("@p = OperatingSystem.GetProcesses();\nSELECT * FROM @p;")
    expect(pg.locator("#scale-check")).to_have_attribute("data-state", "ok")
    # an action is marked, its required parameter is in the template, the cursor lands in its quotes
    pg.fill("#method-search", "kill process")
    kill = pg.locator('.mb-item[data-method="OperatingSystem.KillProcess"]')
    expect(kill).to_be_visible()
    assert kill.get_attribute("data-action") == "true" and kill.locator(".mb-action").text_content() == "action"
    assert pg.locator('.mb-item[data-method="OperatingSystem.GetProcesses"] .mb-action').count() == 0
    _replace(tab, "")
    pg.keyboard.press("Enter")
    pg.focus("#method-search")
    pg.keyboard.press("Enter")  # the first match, as a click; the Ask form is not submitted
    expect(pg.locator("#scale")).to_have_value('\n@killProcess = OperatingSystem.KillProcess(ProcessId: "");')
    pg.keyboard.type("4242")
    expect(pg.locator("#scale")).to_have_value('\n@killProcess = OperatingSystem.KillProcess(ProcessId: "4242");')
    assert pg.url.endswith("#/ask")
    expect(pg.locator("#method-info")).to_contain_text("Action")
    expect(pg.locator("#method-info .mb-params")).to_contain_text("required")
    expect(pg.locator("#scale-check")).to_contain_text("An action (calls OperatingSystem.KillProcess)")
    # a search nothing matches says so
    pg.fill("#method-search", "no-such-method-anywhere")
    expect(pg.locator(".mb-none")).to_be_visible()
    expect(pg.locator("#method-count")).to_have_text(f"0 of {len(listed)}")


def test_a_syntax_error_shows_its_position(tab: Page) -> None:
    pg = tab.page
    text = "@p = OperatingSystem.GetProcesses();\n@q = OperatingSystem.GetProcesses(;\nSELECT * FROM @p;"
    err = _compile_error(text)
    assert (err.line, err.column) == (2, 35)
    _replace(tab, text)
    check = pg.locator("#scale-check")
    expect(check).to_have_attribute("data-state", "error")
    assert (check.get_attribute("data-line"), check.get_attribute("data-column")) == ("2", "35")
    expect(check).to_contain_text(f"Line 2, column 35: {err.message}")
    # the highlighted copy marks the text from the error on: the ';' the compiler did not expect
    expect(pg.locator(".scale-hl .tk-error")).to_have_text(";")
    # the position moves the cursor there
    pg.click("#scale-check .scale-pos")
    at = text.index("(;") + 1
    assert pg.locator("#scale").evaluate("el => [el.selectionStart, el.selectionEnd]") == [at, at]
    pg.keyboard.type("Name: \"x\")")  # -> GetProcesses(Name: "x");  an unknown parameter now
    err2 = _compile_error(pg.locator("#scale").input_value())
    assert err2.message != err.message
    expect(check).to_contain_text(err2.message)
    assert check.get_attribute("data-column") == str(err2.column)
    # columns are characters, as the compiler counts them (an emoji is two UTF-16 units)
    text = '@a = "😀😀😀"; @b = (;'
    err = _compile_error(text)
    _replace(tab, text)
    expect(check).to_have_attribute("data-column", str(err.column))
    expect(pg.locator(".scale-hl .tk-error")).to_have_text("(")
    # an error at the very end gets a marker there
    text = "@p = OperatingSystem.GetProcesses()"
    err = _compile_error(text)
    assert (err.line, err.column) == (1, len(text) + 1)
    _replace(tab, text)
    expect(check).to_contain_text(err.message)
    expect(pg.locator(".scale-hl .tk-error.tk-eof")).to_have_count(1)
    # fixed: the mark goes
    pg.keyboard.type(";")
    expect(check).to_have_attribute("data-state", "ok")
    assert pg.locator(".scale-hl .tk-error").count() == 0


def test_markup_in_the_payload_renders_as_text(tab: Page) -> None:
    pg = tab.page
    text = (f'{HOSTILE}\n@s = SELECT "{HOSTILE}" AS A;\n// </pre><script>window.__pwned=2</script>\n'
            f'ERROR "<b onmouseover=alert(1)>x</b>";')
    _replace(tab, text)
    expect(pg.locator(".scale-hl")).to_have_text(text + "\n ")
    expect(pg.locator("#scale-check")).to_have_attribute("data-state", "error")  # '<' is not SCALE
    expect(pg.locator("#scale-check")).to_contain_text("Unexpected character '<'")
    assert pg.locator(".scale-hl img, .scale-hl script, .scale-hl b, #scale-check img").count() == 0
    assert pg.evaluate("document.querySelectorAll('img').length") == 0
    assert pg.evaluate("window.__pwned") is None
    # every element of the copy is one of the highlighter's spans
    assert set(pg.locator(".scale-hl *").evaluate_all("els => els.map((e) => e.tagName)")) == {"CODE", "SPAN"}


def test_layout_holds_at_800_px(tab: Page) -> None:
    pg = tab.page
    pg.set_viewport_size({"width": 800, "height": 900})
    pg.goto("/Explorer/#/history")
    pg.goto("/Explorer/#/ask")
    pg.wait_for_selector("#method-list .mb-item")
    editor = pg.locator(".scale-editor .editor").bounding_box()
    panel = pg.locator("#method-browser").bounding_box()
    search = pg.locator("#method-search").bounding_box()
    assert editor and panel and search
    for box in (editor, panel, search):
        assert box["x"] >= 0 and box["x"] + box["width"] <= 800, box
    assert editor["width"] > 400 and panel["width"] > 400  # stacked, each the page's width, not squeezed
    assert panel["y"] >= editor["y"] + editor["height"]  # below the editor, not over it
    assert pg.evaluate("document.querySelector('.scale-editor').scrollWidth <= document.querySelector('.scale-editor').clientWidth")
    # still usable: search and insert
    pg.fill("#method-search", "GetSummary")
    _replace(tab, "")
    pg.click('.mb-item[data-method="Device.GetSummary"]')
    expect(pg.locator("#scale")).to_have_value("@summary = Device.GetSummary();")
    # and wide, side by side
    pg.set_viewport_size({"width": 1360, "height": 900})
    editor = pg.locator(".scale-editor .editor").bounding_box()
    panel = pg.locator("#method-browser").bounding_box()
    assert editor and panel and panel["x"] >= editor["x"] + editor["width"] and panel["x"] + panel["width"] <= 1360


def test_no_editor_requests_for_who_asks_through_definitions(browser, server: Server) -> None:  # type: ignore[no-untyped-def]
    t = Page(browser, server)
    try:
        sent: list[str] = []
        t.page.on("request", lambda r: sent.append(r.url))
        t.login(QUESTIONER, PASSWORD)
        with t.page.expect_response("**/Consumer/Devices"):  # the page's last request, after the editor is built
            t.page.goto("/Explorer/#/ask")
        expect(t.page.locator("#def-panel")).to_be_visible()
        expect(t.page.locator("#raw-panel")).to_be_hidden()
        expect(t.page.locator("#scale")).to_be_hidden()
        assert any("/Consumer/InstructionDefinitions" in u for u in sent), sent
        assert not [u for u in sent if "/Consumer/Methods" in u or "/Consumer/Scale/Check" in u], sent
    finally:
        t.close()
