"""Walk the built book in headless Chromium, page by page, as a reader would.

    python tests/browser_walk.py [_build/html]        (`make browser`; part of `make test`)

For every page in _toc.yml (and the search page): it loads without JavaScript errors, every
image has loaded, math is typeset by MathJax, a notebook's Colab button points at that notebook,
solution dropdowns open and close. Search for a word finds pages. Screenshots go to
_build/screenshots/. Exits non-zero with a list of failures.

Chromium is Debian's (`/usr/bin/chromium`), driven by Playwright's Python client; the machine
has no network, so background networking is off and every page must work from localhost.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.toc import toc_files  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
# Console messages known to be harmless: Jupyter Book 1.x's own (see DESIGN.md), and MathJax 2's
# web-font probe, which points a test font at about:blank before loading the real one.
KNOWN = ("THEBE_JS_URL", "Got invalid theme mode", "about:blank")
COLAB = "https://colab.research.google.com/github/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def check_page(page, url: str, doc: str, shots: Path) -> list[str]:
    """Load one page and return what is wrong with it."""
    problems: list[str] = []
    errors: list[str] = []
    page.on(
        "console",
        lambda m: (
            errors.append(f"{m.text} ({m.location.get('url', '')})")
            if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico")
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")

    if page.locator("span.math, div.math").count():
        page.wait_for_function(
            "window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0", timeout=30_000
        )
        typeset = page.locator("span.MathJax, div.MathJax_Display").count()
        raw = page.locator("span.math.notranslate:not(:has(span.MathJax))").count()
        if not typeset or raw:
            problems.append(f"math not rendered ({typeset} typeset, {raw} raw)")

    broken = page.evaluate(
        "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
    )
    problems += [f"image did not load: {src}" for src in broken]

    if doc.startswith("notebooks/"):
        links = page.locator(f"a[href^='{COLAB}']")
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        want = f"/blob/main/{doc}.ipynb"
        if not any(h.endswith(want) for h in hrefs):
            problems.append(f"no Colab launch link ending in {want} (found {hrefs})")

    dropdowns = page.locator(".solution.dropdown")
    for i in range(dropdowns.count()):
        box = dropdowns.nth(i)
        button = box.locator(".toggle-button")
        states = [button.get_attribute("aria-expanded")]
        button.click()
        states.append(button.get_attribute("aria-expanded"))
        visible_open = box.locator(".cell, p").last.is_visible()
        button.click()
        states.append(button.get_attribute("aria-expanded"))
        if states != ["false", "true", "false"] or not visible_open:
            problems.append(f"solution dropdown {i} does not open and close: {states}")

    page.screenshot(path=str(shots / f"{doc.replace('/', '__')}.png"), full_page=True)
    problems += [f"console error: {e}" for e in errors if not any(k in e for k in KNOWN)]
    return problems


def check_search(page, base: str, shots: Path) -> list[str]:
    page.goto(f"{base}/search.html?q=cache", wait_until="load")
    page.wait_for_function(
        "document.querySelectorAll('#search-results li, ul.search li').length > 0",
        timeout=30_000,
    )
    hits = page.locator("#search-results li, ul.search li").count()
    page.screenshot(path=str(shots / "search.png"), full_page=True)
    return [] if hits else ["search for 'cache' found nothing"]


def main(html: Path) -> int:
    if not (html / "index.html").exists():
        print(f"no built book at {html}: run `make book` first")
        return 1
    shots = html.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    server, base = serve(html)
    failures: dict[str, list[str]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            for doc in toc_files():
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                problems = check_page(page, f"{base}/{doc}.html", doc, shots)
                print(f"{'ok  ' if not problems else 'FAIL'} {doc}")
                if problems:
                    failures[doc] = problems
                page.close()
            page = browser.new_page()
            if problems := check_search(page, base, shots):
                failures["search"] = problems
            print(f"{'ok  ' if not problems else 'FAIL'} search")
            browser.close()
    finally:
        server.shutdown()
    for doc, problems in failures.items():
        for problem in problems:
            print(f"{doc}: {problem}")
    print(f"{len(toc_files()) + 1} pages walked, screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_build" / "html"))
