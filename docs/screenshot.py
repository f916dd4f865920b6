"""Make docs/report.png: the sample catalog's report in Chromium (``make screenshot``).

    python docs/screenshot.py out/catalog docs/report.png

Uses the system's Chromium (``/usr/bin/chromium``) through Playwright; nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]


def main(run_folder: str, dest: str, chromium: str = "/usr/bin/chromium") -> int:
    index = Path(run_folder).resolve() / "report" / "index.html"
    if not index.is_file():
        print(f"screenshot: no report at {index}; run `make run` first", file=sys.stderr)
        return 1
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1500}, device_scale_factor=1)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(index.as_uri())
        page.wait_for_selector("body[data-ready='1']")
        page.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => 0)))")
        page.screenshot(path=dest)
        browser.close()
    if errors:
        print(f"screenshot: the page had errors: {errors}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
