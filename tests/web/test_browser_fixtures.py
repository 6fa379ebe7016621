"""The browser fixtures themselves: another host is never reached but recorded, console and page errors are
recorded (a Content-Security-Policy violation among them), and asyncio.run still works around browser tests."""

from __future__ import annotations

import asyncio

from playwright.sync_api import Page

from tests.fixtures.browser import BrowserLog

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


def test_asyncio_run_works_in_a_test_after_a_browser_test() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert asyncio.run(answer()) == 42
