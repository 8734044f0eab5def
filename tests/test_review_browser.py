"""The review page in a real browser (headless Chromium through Selenium): clicks and keys record
decisions, a reload shows them, and the next `make head` applies them. Skipped where Chromium,
chromedriver or Selenium are missing (`make test-browser-deps`); marked slow (`make test-all`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import HeadConfig
from pipeline.decisions import read_decisions
from pipeline.heads.train import train_head
from pipeline.review.server import running

pytest.importorskip("selenium")
pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def browser():
    from review_browser import chrome

    web = chrome()
    if web is None:
        pytest.skip("chromium and chromedriver are not installed (make test-browser-deps)")
    web.implicitly_wait(0)
    yield web
    web.quit()


def tiles(browser):
    return browser.find_elements("css selector", ".item .tile:not(.context)")


def wait_for(browser, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda b: condition())


def test_clicks_and_keys_record_decisions_that_a_reload_shows_and_make_head_applies(audit_dir, browser, tmp_path):
    from review_browser import open_page
    from selenium.webdriver.support.ui import Select

    with running(audit_dir) as server:
        open_page(browser, server.url + "#section=label&offset=0&limit=50")
        first, second = tiles(browser)[:2]
        assert first.get_attribute("data-decision") == "undecided"
        first.find_element("css selector", "button[data-act=exclude]").click()
        wait_for(browser, lambda: first.get_attribute("data-decision") == "exclude")

        given = second.find_element("css selector", ".meta").text.split("·")[1].strip()
        target = next(c for c in ("cat", "dog", "fox") if c != given)
        Select(second.find_element("css selector", "select.relabel-to")).select_by_value(target)
        second.find_element("css selector", "button[data-act=relabel]").click()
        wait_for(browser, lambda: second.get_attribute("data-decision") == "relabel")
        assert f"relabelled {given} → {target}" in second.text

        # Keys in the leaks section: 'e' on the first image, an exact copy: both copies are one content, one
        # decision; then 'j' past the copy to the near copy's first image, 'p' keeps it, its partner stays undecided.
        open_page(browser, server.url + "#section=leaks&offset=0&limit=50")
        body = browser.find_element("tag name", "body")
        body.send_keys("e")
        leak = tiles(browser)[:4]
        wait_for(browser, lambda: [t.get_attribute("data-decision") for t in leak[:2]] == ["exclude", "exclude"])
        assert "byte-identical" in browser.find_element("css selector", ".item").text
        body.send_keys("j")
        body.send_keys("p")
        wait_for(browser, lambda: [t.get_attribute("data-decision") for t in leak[2:]] == ["keep", "undecided"])

        browser.refresh()  # everything shown after a reload comes from the decisions file through the server
        open_page(browser, server.url + "#section=label&offset=0&limit=50")
        first, second = tiles(browser)[:2]
        assert [first.get_attribute("data-decision"), second.get_attribute("data-decision")] == ["exclude", "relabel"]
        assert "Decided: 1 kept · 2 excluded · 1 relabelled" in browser.find_element("id", "counts").text

    path = audit_dir.parent / "generated.decisions.csv"
    saved = sorted((d.path, d.decision, d.label) for d in read_decisions(path).values())
    assert [d for _, d, _ in saved].count("exclude") == 2 and [d for _, d, _ in saved].count("keep") == 1
    assert any(d == "relabel" and label == target for _, d, label in saved)

    # The next `make head` finds the dataset's decisions and applies them (test rows only with DECISIONS_TEST).
    features = Path(json.loads((audit_dir / "audit.json").read_text())["features"])
    config = HeadConfig(runs_dir=str(tmp_path / "runs"), grid_images=0, audit_dir=str(audit_dir.parent))
    decided = train_head(features, config).metrics["decisions"]
    applied = {
        k: sum(c[k] for c in decided["applied"].values()) + decided["test_not_applied"][k]
        for k in decided["test_not_applied"]
    }
    # The label item's image, and the train copy of the exact leak (plus its byte-identical test copy).
    assert applied == {"exclude": 3, "relabel": 1}


def test_paging_moves_through_a_section(audit_dir, browser):
    from review_browser import open_page

    with running(audit_dir) as server:
        open_page(browser, server.url + "#section=leaks&offset=0&limit=25")
        assert browser.find_element("css selector", "#pager-top .range").text == "1–2 of 2"
        assert browser.find_element("css selector", "#pager-top .next").get_attribute("disabled") is not None
        browser.find_element("css selector", "nav button[data-section=duplicates]").click()
        wait_for(
            browser, lambda: browser.find_element("tag name", "body").get_attribute("data-loaded") == "duplicates:0"
        )
        assert len(browser.find_elements("css selector", ".item")) == 1


def test_screenshots_of_every_section_stay_small(audit_dir, browser, tmp_path):
    from review_browser import SHOTS, screenshots

    with running(audit_dir) as server:
        saved = screenshots(browser, server.url, tmp_path / "images")
    assert [p.name for p in saved] == list(SHOTS.values())
    assert all(0 < p.stat().st_size < 200_000 for p in saved)
