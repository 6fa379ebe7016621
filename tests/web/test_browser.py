"""The web UI in a real headless chromium against the real stack (Ray Serve, Postgres, Redis): sign in, review
three items with the keyboard, export (a refused range, then a file), another site's detection, a form without
its token, keyboard reach, alt text and page weight at desktop and tablet sizes; screenshots for docs/ui.md."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from playwright.sync_api import Page, expect

from batch.report import build_report
from serve_app.exports import scripts
from serve_app.store.reports import store_report
from tests.fixtures.browser import BrowserLog, screenshot
from tests.helpers import auth
from tests.web.scenario import MODEL, ReviewScenario, review_scenario

pytestmark = pytest.mark.slow

PAGE_BUDGET_BYTES = 150_000
TABLET = {"width": 768, "height": 1024}
INTERACTIVE = "a[href], button, input:not([type=hidden]), select, textarea"


def shot(page: Page, name: str) -> None:
    screenshot(page, name, full_page=True)


def page_weight(page: Page) -> int:
    """Bytes of the document and everything it loaded except images (what a slow link pays for a page)."""
    total: int = page.evaluate(
        """() => {
          const nav = performance.getEntriesByType('navigation')[0];
          const rest = performance.getEntriesByType('resource').filter(r => r.initiatorType !== 'img');
          return [nav, ...rest].reduce((n, e) => n + (e.decodedBodySize || 0), 0);
        }"""
    )
    return total


def check_page(page: Page) -> None:
    """What every page owes a person: alt text on images, nothing wider than the screen, every control
    reachable with Tab, under the weight budget."""
    missing_alt = page.locator("img:not([alt]), img[alt='']")
    expect(missing_alt).to_have_count(0)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"
    assert page_weight(page) < PAGE_BUDGET_BYTES
    controls: list[str] = page.locator(INTERACTIVE).evaluate_all(
        """els => els.filter(e => e.offsetParent !== null && !e.disabled)
                   .map((e, i) => { e.dataset.tabCheck = String(i); return e.outerHTML.slice(0, 120); })"""
    )
    page.locator("body").focus()
    reached: set[int] = set()
    for _ in range(3 * len(controls) + 10):  # a date input takes three stops (day, month, year)
        page.keyboard.press("Tab")
        index = page.evaluate("document.activeElement.dataset ? document.activeElement.dataset.tabCheck : null")
        if index is not None:
            reached.add(int(index))
        if len(reached) == len(controls):
            break
    missed = [controls[i] for i in range(len(controls)) if i not in reached]
    assert not missed, f"not reachable with Tab: {missed}"


def ready(page: Page) -> None:
    """Wait until the page's scripts run (the keys work only then; a heading can show before)."""
    page.wait_for_load_state("load")


def sign_in(page: Page, base: str, key: str, *, to: str = "/ui/review") -> None:
    page.goto(base + to)
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(to) + "$"))


@pytest.fixture
def scenario(db: psycopg.Connection[Any], serve_root: Path) -> ReviewScenario:
    return review_scenario(db, serve_root / "images")


def test_review_three_items_with_the_keyboard(
    serve_url: str, page: Page, browser_log: BrowserLog, scenario: ReviewScenario
) -> None:
    sign_in(page, serve_url, scenario.key)
    left = page.locator("#left")
    expect(left).to_contain_text("4 detections left")
    title = page.locator("#subject-title")
    expect(title).to_have_text(f"Detection {scenario.queue[0]}")
    expect(page.locator(".candidate img").first).to_have_js_property("complete", True)
    shot(page, "review")
    check_page(page)
    page.keyboard.press("ArrowRight")
    expect(title).to_have_text(f"Detection {scenario.queue[1]}")
    ready(page)
    page.keyboard.press("ArrowLeft")
    expect(title).to_have_text(f"Detection {scenario.queue[0]}")

    decisions = [("1", "left ear notched"), ("u", "only a leg in frame"), ("n", "new buck by the creek")]
    for i, (key, note) in enumerate(decisions):
        expect(title).to_have_text(f"Detection {scenario.queue[i]}")
        ready(page)
        page.locator("#note").fill(note)
        page.keyboard.press("Escape")
        page.keyboard.press(key)
        if key == "n":  # n asks for the new individual's name; Enter creates it
            expect(page.locator("#new_name")).to_be_focused()
            page.keyboard.type("Creek buck")
            page.keyboard.press("Enter")
        expect(left).to_contain_text(f"{3 - i} detection")

    seen = [
        httpx.get(f"{serve_url}/api/detections/{d}", headers=auth(scenario.key), timeout=30).json()
        for d in scenario.queue[:3]
    ]
    assert [(s["decision"], [(e["action"], e["note"]) for e in s["review_events"]]) for s in seen] == [
        ("manual", [("assign", "left ear notched")]),
        ("unassigned", [("unassign", "only a leg in frame")]),
        ("manual", [("new_deer", "new buck by the creek")]),
    ]
    assert seen[0]["deer_id"] == scenario.deer[0]  # key 1: the top candidate
    assert browser_log.errors == []


def test_access_and_forms_need_the_session_and_its_token(
    serve_url: str, page: Page, browser_log: BrowserLog, scenario: ReviewScenario, db: psycopg.Connection[Any]
) -> None:
    sign_in(page, serve_url, scenario.key)
    other = page.goto(f"{serve_url}/ui/review/{scenario.other_detection}")
    assert other is not None and other.status == 404
    expect(page.get_by_role("heading", level=1)).to_contain_text("Not found")
    assert [e for e in browser_log.console_errors if "404" not in e] == []  # the browser logs the 404 itself
    browser_log.console_errors.clear()
    crop = page.request.get(f"{serve_url}/ui/crops/{scenario.other_detection}")
    assert crop.status == 404
    target = scenario.queue[3]
    forged = page.request.post(f"{serve_url}/ui/review/{target}", form={"action": "unassign"})
    assert forged.status == 403
    row = db.execute("SELECT decision FROM detections WHERE id = %s", (target,)).fetchone()
    assert row == {"decision": "review"}
    # Tablet width: the same page without sideways scrolling.
    page.set_viewport_size(TABLET)
    page.goto(f"{serve_url}/ui/review/{target}")
    check_page(page)
    shot(page, "detection-tablet")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile("/ui/login$"))
    assert page.goto(f"{serve_url}/ui/review") is not None
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    assert browser_log.errors == []


def test_export_refused_beside_its_field_then_completed_and_downloaded(
    serve_url: str, page: Page, browser_log: BrowserLog, scenario: ReviewScenario, redis_url: str
) -> None:
    today = dt.datetime.now(dt.UTC).date()
    jobs = redis.Redis.from_url(redis_url)
    before = len(list(jobs.scan_iter(match=scripts.JOB_PREFIX + "*", count=1000)))
    sign_in(page, serve_url, scenario.key, to="/ui/exports")
    page.get_by_label("First day").fill(str(today))
    page.get_by_label("Last day").fill(str(today - dt.timedelta(days=3)))
    page.get_by_role("button", name="Request export").click()
    expect(page.locator("#err-end_date")).to_contain_text("VR-001")
    expect(page.get_by_label("Last day")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#jobs")).to_contain_text("No exports requested")
    shot(page, "exports-refused")
    assert [e for e in browser_log.console_errors if "400" not in e] == []  # the browser logs the refusal itself
    browser_log.console_errors.clear()
    assert len(list(jobs.scan_iter(match=scripts.JOB_PREFIX + "*", count=1000))) == before

    page.get_by_label("First day").fill(str(today - dt.timedelta(days=7)))
    page.get_by_label("Last day").fill(str(today))
    page.get_by_label("Format").select_option("csv")
    page.get_by_role("button", name="Request export").click()
    done = page.locator("#jobs tr[data-status='completed']")
    expect(done).to_have_count(1, timeout=120_000)  # the list polls until the job ends
    expect(page.locator("#jobs")).to_have_attribute("data-polling", "no")
    shot(page, "exports")
    check_page(page)
    with page.expect_download() as download:
        page.get_by_role("link", name=re.compile("Download csv")).click()
    content = Path(download.value.path()).read_text()
    assert content.splitlines()[0].count(",") >= 2
    assert browser_log.errors == []


def test_profiles_and_reports_pages(
    serve_url: str, page: Page, browser_log: BrowserLog, scenario: ReviewScenario, db: psycopg.Connection[Any]
) -> None:
    report = build_report(db, model_version=MODEL, sites=[scenario.site])
    store_report(db, model_version=MODEL, sites=[scenario.site], report=report)
    sign_in(page, serve_url, scenario.key, to="/ui/deer")
    for name in scenario.deer_names:
        expect(page.get_by_role("link", name=re.compile(name)).first).to_be_visible()
    loaded = "() => Array.from(document.images).every(e => e.complete && e.naturalWidth > 0)"
    page.wait_for_function(loaded)
    shot(page, "deer")
    check_page(page)

    page.goto(f"{serve_url}/ui/deer/{scenario.deer[0]}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(scenario.deer_names[0])
    expect(page.locator("svg title").first).to_be_attached()
    shot(page, "deer-profile")
    check_page(page)

    page.goto(f"{serve_url}/ui/reports")
    histogram = page.locator("img[src*='histogram.png']")
    expect(histogram).to_have_count(1)
    page.wait_for_function(loaded)
    expect(page.locator("main")).to_contain_text(MODEL)
    shot(page, "reports")
    check_page(page)
    assert browser_log.errors == []
