"""The dashboard as an operator uses it: Debian's Chromium, driven by Playwright.

Each page is loaded against the live world of conftest.py, its numbers compared with
the database, and a screenshot kept in ``$PGBUS_TEST_ARTEFACTS`` (default: the test's
tmp directory). The browser is ``/usr/bin/chromium`` (``$PGBUS_CHROMIUM``); Playwright's
own browser downloads are never used.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _helpers import missing
from _secrets import TOKEN

from pgbus.durable import list_dead_letters, list_subscriptions

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

playwright_api = pytest.importorskip("playwright.async_api")

#: Chromium's switches for a quiet, sandbox-free headless run in a container.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("PGBUS_CHROMIUM", "/usr/bin/chromium")
    found = shutil.which(path)
    if found is None:
        missing(f"no Chromium at {path} (apt-get install chromium)")
    return found


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``$PGBUS_TEST_ARTEFACTS``, else the test's tmp directory."""
    where = Path(os.environ.get("PGBUS_TEST_ARTEFACTS") or tmp_path / "artefacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[object]:
    """A fresh Chromium profile (a persistent context in the test's tmp directory)."""
    executable = _chromium()
    async with playwright_api.async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


async def _number(page: object, selector: str) -> int:
    text = await page.locator(selector).first.inner_text()  # type: ignore[attr-defined]
    return int(text.strip())


async def test_overview_page_shows_the_live_bus(world, dashboard, browser, artefacts):
    """The overview shows the live bus, its counters as the bus counted them, and live plots."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    async with dashboard(window=20) as url:
        await page.goto(url + "/")
        await page.locator(f'tr[data-channel="{world.channel}"]').wait_for()
        assert await page.locator("#bus-count").inner_text() == "1"
        # traffic for a few refreshes: the fragment re-renders and the rate plot rises
        sent = world.published
        for _ in range(16):
            await world.bus.publish_many([world.ping(n=sent + i) for i in range(40)])
            sent += 40
            await page.wait_for_timeout(250)  # pacing the traffic, not waiting for it
        assert await page.evaluate("() => document.querySelector('#overview').dataset.refreshedAt")
        row = page.locator(f'tr[data-channel="{world.channel}"]')
        await page.wait_for_function(
            "([channel, n]) => document.querySelector(`tr[data-channel='${channel}'] td.handled`)"
            "?.textContent.trim() === String(n)",
            arg=[world.channel, sent],
        )
        assert await _number(row, "td.received") == sent
        assert world.bus.metrics.snapshot().channels[world.channel].received == sent
        assert re.fullmatch(r"\d+\.\d{4} %", await page.locator("#queue-usage").inner_text())
        points = await page.locator("section.bus polyline.s0").first.get_attribute("points")
        heights = [float(xy.split(",")[1]) for xy in (points or "").split()]
        assert min(heights) < 100, "the received/s line never rose"
        await page.screenshot(path=str(artefacts / "overview.png"), full_page=True)
    assert errors == []


async def test_durable_page_matches_the_database(world, dashboard, browser, artefacts, pg_conn):
    """The durable page shows the group's backlog, its member's lease and the scheduled event."""
    page = await browser.new_page()
    async with dashboard() as url:
        await page.goto(url + "/login?next=/durable")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(url + "/durable")
        row = page.locator('tr[data-subscription="billing"]')
        [sub] = await list_subscriptions(pg_conn, world.schema)
        assert await _number(row, "td.backlog") == sub.backlog == world.backlog_events
        assert "events until" in await row.locator("td.members").inner_text()
        assert await page.locator("#scheduled-total").inner_text() == "1"
        await page.screenshot(path=str(artefacts / "durable.png"), full_page=True)
        # drop asks first; cancelling changes nothing
        await row.locator("button.danger").click()
        await page.locator("#confirm").wait_for()
        await page.click("#cancel")
        await page.wait_for_url(url + "/durable")
    assert len(await list_subscriptions(pg_conn, world.schema)) == 1


async def test_dead_letters_page_redelivers_only_with_the_token(
    world, dashboard, browser, artefacts, pg_conn
):
    """Dead letters are listed as stored, a script payload stays text, redeliver needs the token."""
    page = await browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    target = world.dead_ids[1]
    async with dashboard() as url:
        await page.goto(url + "/dead-letters")
        stored = await list_dead_letters(pg_conn, world.schema)
        assert await _number(page, "#letter-count") == len(stored) == 3
        await page.locator(f'tr[data-id="{world.xss_id}"] summary').click()
        shown = await page.locator(f'tr[data-id="{world.xss_id}"] pre.payload').inner_text()
        assert shown.startswith("<script>window.__pwned")
        assert await page.evaluate("() => window.__pwned") is None
        assert await page.locator("main script, main img").count() == 0
        await page.screenshot(path=str(artefacts / "dead-letters.png"), full_page=True)

        # without logging in there is no button, and a request from the page is refused
        assert await page.locator("#redeliver").count() == 0
        status = await page.evaluate(
            """async (id) => (await fetch('/actions/dead-letters/redeliver', {method: 'POST',
                 headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                 body: 'ids=' + id})).status""",
            target,
        )
        assert status == 401
        assert target in [r.id for r in await list_dead_letters(pg_conn, world.schema)]

        await page.click("header a[href='/login']")
        await page.fill("input[name=token]", "not the token")
        await page.click("form.login button")
        assert "wrong token" in await page.locator("p.flash.bad").inner_text()
        await page.fill("input[name=token]", TOKEN)
        await page.click("form.login button")
        await page.goto(url + "/dead-letters?subscription=billing")
        await page.check(f'input[name=ids][value="{target}"]')
        await page.click("#redeliver")
        message = await page.locator("p.flash.ok").inner_text()
        assert f"redelivered dead letters [{target}]" in message
    remaining = [r.id for r in await list_dead_letters(pg_conn, world.schema)]
    assert target not in remaining
    assert dialogs == []


async def test_health_page_is_green(world, dashboard, browser, artefacts):
    """The health page shows `pgbus doctor`'s checks, none of them failing."""
    page = await browser.new_page()
    async with dashboard() as url:
        await page.goto(url + "/health")
        rows = page.locator("table.health tr")
        assert await rows.count() >= 6
        assert await page.locator("tr.status-fail").count() == 0
        assert await page.locator('tr[data-check="LISTEN"].status-ok').count() == 1
        await page.screenshot(path=str(artefacts / "health.png"), full_page=True)
