"""The browser fixtures themselves: another host is never reached but recorded, console and page errors are
recorded (a Content-Security-Policy violation among them), and asyncio.run still works around browser tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import Page

from tests.fixtures.browser import BrowserLog

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = "http://example.com/pixel.png"


def test_a_request_to_another_host_is_aborted_and_recorded(page: Page, browser_log: BrowserLog) -> None:
    with page.expect_event("requestfailed") as failed:
        page.set_content(f'<img src="{OUTSIDE}" alt="">')
    assert failed.value.url == OUTSIDE
    assert "ERR_BLOCKED_BY_CLIENT" in (failed.value.failure or "")
    assert browser_log.outside_requests == [OUTSIDE]
    browser_log.outside_requests.clear()  # recorded as it should be; the page fixture would fail the test


def test_console_and_page_errors_are_recorded(page: Page, browser_log: BrowserLog) -> None:
    with page.expect_console_message(lambda message: message.type == "error"):
        page.evaluate("console.error('logged by the page')")
    with page.expect_event("pageerror"):
        page.evaluate("setTimeout(() => { throw new Error('thrown by the page') }, 0)")
    assert browser_log.console_errors[0].startswith("logged by the page")
    assert browser_log.page_errors == ["Error: thrown by the page"]


def test_an_inline_script_on_an_app_page_is_refused_and_recorded(
    live_app: str, page: Page, browser_log: BrowserLog
) -> None:
    page.goto(live_app + "/static/docs/docs.css")
    with page.expect_console_message(lambda message: message.type == "error"):
        page.evaluate(
            "() => { const s = document.createElement('script'); s.textContent = 'window.ran = true';"
            " document.documentElement.appendChild(s); }"
        )
    assert page.evaluate("window.ran === undefined")
    assert "Content Security Policy" in browser_log.console_errors[0]


# A session of its own, in this order whatever order the outer run takes: asyncio.run before the browser starts,
# a real page, asyncio.run after it. A browser test itself holds Playwright's loop as running (asyncio.run
# refuses there by design); the one after must find it released.
AROUND_A_BROWSER_TEST = """
import asyncio

from playwright.sync_api import Page


async def answer() -> int:
    await asyncio.sleep(0)  # one suspension: the coroutine resumes only if asyncio.run's loop really runs it
    return 42


def test_asyncio_run_before_the_browser_starts() -> None:
    assert asyncio.run(answer()) == 42


def test_a_page_draws_its_content(page: Page) -> None:
    page.set_content("<p id='said'>drawn</p>")
    assert page.inner_text("#said") == "drawn"


def test_asyncio_run_after_a_browser_test() -> None:
    assert asyncio.run(answer()) == 42
"""


def test_asyncio_run_works_in_the_test_after_a_browser_test(tmp_path: Path) -> None:
    tests = tmp_path / "test_around_a_browser_test.py"
    tests.write_text(AROUND_A_BROWSER_TEST)
    # The project's pytest settings (warnings are errors) and its browser fixtures, none of its other conftest.
    settings = ["-c", str(ROOT / "pyproject.toml"), "-p", "tests.fixtures.browser", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests), *settings, "-v"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    for name in ("before_the_browser_starts", "a_page_draws_its_content", "after_a_browser_test"):
        assert re.search(rf"::test_\w*{name} PASSED", report), report
