"""Results grid benchmark (issue 12): a real server, an instruction of 50,000 devices x 10 rows
written straight into its Responses database, and the portal in real Chromium (Playwright,
/usr/bin/chromium): time to the first page, each page turn, a header-click sort and a filter
(from the action to the pager showing the new page), and the tab's JS heap and DOM node count
(CDP ``Performance.getMetrics`` after a forced GC) across the page turns.

    python bench/results_page.py [--devices 50000] [--turns 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchServer, machine  # noqa: E402
from _results import admin, seed  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50_000)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--turns", type=int, default=20)
    a = ap.parse_args()
    total = a.devices * a.rows
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        s = BenchServer(Path(tmp) / "server", switches=1)
        s.init()
        s.start()
        try:
            iid = seed(s.root, a.devices, a.rows)
            user, password = admin(s.root)
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                ctx = b.new_context(ignore_https_errors=True, base_url=f"https://localhost:{s.https}",
                                    viewport={"width": 1360, "height": 900})
                pg = ctx.new_page()
                pg.set_default_timeout(60_000)
                cdp = ctx.new_cdp_session(pg)
                cdp.send("Performance.enable")

                def metrics() -> dict[str, float]:
                    cdp.send("HeapProfiler.collectGarbage")
                    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}

                pg.goto("/Explorer/")
                pg.fill("#login-username", user)
                pg.fill("#login-password", password)
                pg.click("form.login-form button[type=submit]")
                pg.wait_for_selector("#nav:not([hidden])")
                info = pg.locator(".pager-info")

                # Times are taken in the page (performance.now() when the action starts, and a
                # MutationObserver's stamp when the pager first shows the new page): Playwright's
                # waits poll at 100, 250, 500 ms ..., which would round every figure up to a step.
                pg.evaluate("""() => { window.__pager = [];
                  new MutationObserver(() => { const el = document.querySelector('.pager-info');
                    if (el) window.__pager.push([performance.now(), el.textContent]); })
                  .observe(document.body, { subtree: true, childList: true, characterData: true }); }""")

                def timed(action, text: str) -> float:  # type: ignore[no-untyped-def]
                    t0 = pg.evaluate("performance.now()")
                    action()
                    pg.locator(f'.pager-info:text-is("{text}")').wait_for()  # no ElementHandle kept
                    stamps = pg.evaluate("window.__pager.splice(0)")
                    return min(t for t, shown in stamps if shown == text and t >= t0) / 1000 - t0 / 1000

                first = timed(lambda: pg.goto(f"/Explorer/#/i/{iid}"), f"1–100 of {total}")
                heap, nodes, turns = [], [], []
                for i in range(1, a.turns + 1):
                    turns.append(timed(lambda: pg.click(".pager [data-test=next]"),
                                       f"{i * 100 + 1}–{i * 100 + 100} of {total}"))
                    m = metrics()
                    heap.append(m["JSHeapUsedSize"] / 1e6)
                    nodes.append(m["Nodes"])
                far = timed(lambda: pg.goto(f"/Explorer/#/i/{iid}?offset={total - 100}"),
                            f"{total - 99}–{total} of {total}")
                pg.goto(f"/Explorer/#/i/{iid}")
                expect(info).to_have_text(f"1–100 of {total}")
                t0 = pg.evaluate("performance.now()")  # the pager keeps its text: stamp the redraw
                pg.evaluate("window.__pager.splice(0)")
                pg.click("#results-table th[data-sort=Memory]")
                pg.locator("#results-table th[data-sort=Memory][aria-sort=ascending]").wait_for()
                sort = (min(t for t, _ in pg.evaluate("window.__pager.splice(0)")) - t0) / 1000
                sort_turn = timed(lambda: pg.click(".pager [data-test=next]"), f"101–200 of {total}")

                def filt() -> None:
                    pg.fill("#results-filter", "Memory:gt:500000000")
                    pg.press("#results-filter", "Enter")
                matching = sum(1 for n in range(a.devices) for r in range(a.rows) if 1_048_576 * ((n + r) % 512) > 5e8)
                filtered = timed(filt, f"1–100 of {matching}")
                b.close()
        finally:
            s.stop()
    print(f"{a.devices} devices x {a.rows} rows = {total} rows, 100 rows a page")
    print(f"first page {first:.2f} s; page turns median {statistics.median(turns):.2f} s, max {max(turns):.2f} s "
          f"({a.turns} turns); last page (offset {total - 100}) {far:.2f} s")
    print(f"sort by Memory (click) {sort:.2f} s, next page of the sort {sort_turn:.2f} s; filter Memory:gt {filtered:.2f} s")
    print(f"tab JS heap after GC, MB: turn 1 {heap[0]:.1f}, turn {a.turns // 2} {heap[a.turns // 2 - 1]:.1f}, "
          f"turn {a.turns} {heap[-1]:.1f}; DOM nodes {int(nodes[0])} .. {int(nodes[-1])}")


if __name__ == "__main__":
    main()
