"""Headless Chromium on the review page: the browser tests' helpers, and the script behind docs/images/review-*.png.

    PYTHONPATH=. python tests/review_browser.py AUDIT_DIR docs/images [label,duplicates,leaks,outliers]

serves a copy of the audit folder AUDIT_DIR (its decisions go to a temporary
folder, never beside the real audit), makes a few decisions through the API, and
saves one screenshot per section, palette-quantized so each PNG stays small.
Needs selenium, chromium and chromedriver (`make test-browser-deps`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

SHOTS = {
    "label": "review-labels.png",
    "duplicates": "review-duplicates.png",
    "leaks": "review-leaks.png",
    "outliers": "review-outliers.png",
}


def find_binary(*names: str) -> str | None:
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def chrome(size: str = "1400,1000"):
    """A headless Chromium driven by chromedriver; None when either is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = find_binary("chromium", "chromium-browser", "google-chrome"), find_binary("chromedriver")
    if not (chromium and driver):
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def open_page(browser, url: str) -> None:
    """Loads `url` and waits until the page has rendered the section it names, images included."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    want = url.split("section=")[1].split("&")[0] if "section=" in url else ""
    WebDriverWait(browser, 15).until(
        lambda b: (b.find_element("tag name", "body").get_attribute("data-loaded") or "").startswith(want)
    )
    WebDriverWait(browser, 15).until(lambda b: b.execute_script("return [...document.images].every((i) => i.complete)"))


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "api/decisions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return json.load(urllib.request.urlopen(request, timeout=10))


def save_png(browser, path: Path, colors: int = 128) -> Path:
    """A screenshot as a palette PNG (a page of flat colours and thumbnails: a few times smaller than RGB)."""
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def screenshots(browser, url: str, out: Path, sections: tuple[str, ...] = tuple(SHOTS)) -> list[Path]:
    """Decides on a few items through the API, then saves one screenshot per section (SHOTS names the files)."""
    out.mkdir(parents=True, exist_ok=True)
    page = json.load(urllib.request.urlopen(f"{url}api/items?section=label&limit=6", timeout=10))
    items = page["items"]
    if len(items) >= 3:
        first = items[0]["members"][0]
        post(url, {"id": first["id"], "decision": "relabel", "label": items[0]["suggested"]})
        post(url, {"id": items[1]["members"][0]["id"], "decision": "exclude"})
        post(url, {"id": items[2]["members"][0]["id"], "decision": "keep"})
    saved = []
    for section in sections:
        open_page(browser, f"{url}#section={section}&offset=0&limit=25")
        saved.append(save_png(browser, out / SHOTS[section]))
    return saved


def main(audit: str, out: str, sections: str = ",".join(SHOTS)) -> None:
    from pipeline.review.server import running

    work = Path(tempfile.mkdtemp()) / "audit"
    copy = Path(shutil.copytree(audit, work / Path(audit).name, ignore=shutil.ignore_patterns("*.decisions.csv*")))
    browser = chrome("1400,900")
    if browser is None:
        raise SystemExit("chromium and chromedriver are needed: make test-browser-deps")
    try:
        with running(copy) as server:
            for path in screenshots(browser, server.url, Path(out), tuple(sections.split(","))):
                log.info("%s: %d KB", path, path.stat().st_size // 1024)
    finally:
        browser.quit()
        shutil.rmtree(work.parent, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*sys.argv[1:])
