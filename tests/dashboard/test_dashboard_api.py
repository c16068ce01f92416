"""The dashboard over HTTP: its pages, its JSON API, and who may change what."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys

import asyncpg
import httpx
import pytest
from _helpers import cli_env, logged, run_cli
from _secrets import TOKEN

from pgbus.durable import list_dead_letters, list_subscriptions

BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def _live_bus(client: httpx.AsyncClient, channel: str, received: int) -> dict:
    """The overview's bus once its snapshot counts ``received`` events on ``channel``."""
    async with asyncio.timeout(15):
        while True:
            data = (await client.get("/api/overview")).json()
            for entry in data["buses"].values():
                stats = entry["snapshot"]["channels"].get(channel, {})
                if stats.get("received") == received and len(entry["history"]) >= 2:
                    return entry
            await asyncio.sleep(0.1)


async def test_overview_shows_the_live_bus_and_the_queue(world, dashboard):
    """The overview reports each live bus's channels, counters and history, and the queue."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        entry = await _live_bus(client, world.channel, world.published)
        snapshot = entry["snapshot"]
        assert snapshot["connected"] is True
        assert snapshot["channels"][world.channel]["handled"] == world.published
        assert "on_ping" in snapshot["subscriptions"]
        data = (await client.get("/api/overview")).json()
        assert 0 <= data["queue_usage"] < 1
        page = await client.get("/")
        assert page.status_code == 200
        assert world.channel in page.text
        assert "<svg" in page.text
        assert "pg_notification_queue_usage()" in page.text
        fragment = await client.get("/fragments/overview")
        assert "<html" not in fragment.text
        assert world.channel in fragment.text


HOSTILE = {  # what each does to a real snapshot
    "never stale": lambda snap: snap.update(ts=1e12),
    "infinite lag": lambda snap: snap["channels"]["c"].update(lag_max=math.inf),
    "text counter": lambda snap: snap["channels"]["c"].update(failed="x"),
    "null counter": lambda snap: snap["channels"]["c"].update(failed=None),
    "zero interval": lambda snap: snap.update(interval=0),
    "listed for ages": lambda snap: snap.update(interval=1e300),
    "channels a list": lambda snap: snap.update(channels=[1]),
    "no subscriptions": lambda snap: snap.pop("subscriptions"),
    "no connected": lambda snap: snap.pop("connected"),
}


@pytest.mark.parametrize("spoil", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_snapshot_breaks_no_page(world, dashboard, pg_conn, spoil):
    """Any role may NOTIFY the metrics channel: what is not a sane snapshot is ignored."""
    channel = f"{world.channel}_metrics"
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        real = dict((await _live_bus(client, world.channel, world.published))["snapshot"])
        real.pop("rates", None)  # the board's own
        real["channels"] = {"c": {"received": 1, "failed": 0, "lag_max": 0.1}}
        hostile, sentinel = json.loads(json.dumps(real)), dict(real, bus="sentinel")
        hostile["bus"] = "evil"
        spoil(hostile)
        await pg_conn.execute(
            "SELECT pg_notify($1, $2), pg_notify($1, $3)",
            channel,
            json.dumps(hostile),  # inf becomes Infinity, which json.loads reads
            json.dumps(sentinel),  # in order after the hostile one: once shown, it was read
        )
        async with asyncio.timeout(15):
            while "sentinel" not in (await client.get("/api/overview")).json()["buses"]:  # noqa: ASYNC110 - polling the page, as a browser does
                await asyncio.sleep(0.1)
        for path in ("/", "/api/overview", "/fragments/overview"):
            assert (await client.get(path)).status_code == 200, path
        assert "evil" not in (await client.get("/api/overview")).json()["buses"]


async def test_odd_numbers_are_refused_not_failures(world, dashboard):
    """A non-ASCII digit as the limit, or an id beyond bigint, is a 200 or a 400, never 500."""
    async with dashboard(token=TOKEN) as url, httpx.AsyncClient(base_url=url) as client:
        page = await client.get("/dead-letters", params={"limit": "\u00b2"})
        assert page.status_code == 200
        huge = await client.post(
            "/api/dead-letters/redeliver", json={"ids": [2**64]}, headers=BEARER
        )
        assert huge.status_code == 400
        assert "no such dead letter" in huge.json()["error"]


async def test_every_response_forbids_inline_script_and_framing(world, dashboard):
    """Pages carry a Content-Security-Policy without inline script, and refuse framing."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/dead-letters")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_durable_api_matches_the_database(world, dashboard, pg_conn):
    """The durable API reports each group's backlog, its member's lease and the scheduled event."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        data = (await client.get("/api/durable")).json()
        page = await client.get("/durable")
    [expected] = await list_subscriptions(pg_conn, world.schema)
    [sub] = data["subscriptions"]
    assert sub["subscription"]["name"] == "billing"
    assert sub["subscription"]["backlog"] == expected.backlog == world.backlog_events
    assert sub["backlog_seconds"] >= 0
    [lease] = sub["leases"]
    assert lease["events"] == world.backlog_events
    assert sub["position"]
    assert data["scheduled_total"] == 1
    assert data["scheduled"][0]["channel"] == world.durable_channel
    assert page.status_code == 200
    assert re.search(r'class="num backlog">\s*4\s*<', page.text)


async def test_dead_letters_are_listed_and_filtered(world, dashboard, pg_conn):
    """The dead-letter API lists what the table holds, filtered by subscription, channel, error."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        everything = (await client.get("/api/dead-letters")).json()
        billing = (await client.get("/api/dead-letters?subscription=billing")).json()
        declined = (await client.get("/api/dead-letters?error=DECLINED")).json()
        other = (await client.get("/api/dead-letters?channel=elsewhere")).json()
    stored = await list_dead_letters(pg_conn, world.schema)
    assert [row["id"] for row in everything] == [row.id for row in stored] == world.dead_ids
    assert [row["subscription"] for row in billing] == ["billing"]
    assert [row["error"] for row in declined] == ["ValueError: card declined"]
    assert other == []


async def test_payloads_and_errors_are_escaped(world, dashboard):
    """A dead letter holding a script is shown as text: the page never contains it as markup."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        page = (await client.get("/dead-letters")).text
    assert "<script>window.__pwned" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;window.__pwned = true;" in page


async def test_redeliver_needs_the_token(world, dashboard, pg_conn):
    """Redelivery is refused without the token or with a wrong one, and works with it."""
    dead_id = world.dead_ids[0]
    listener = await asyncpg.connect(world.dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(world.channel, lambda *args: heard.put_nowait(args[3]))
    try:
        async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
            anonymous = await client.post("/api/dead-letters/redeliver", json={"ids": [dead_id]})
            wrong = await client.post(
                "/api/dead-letters/redeliver",
                json={"ids": [dead_id]},
                headers={"Authorization": "Bearer nope"},
            )
            assert (anonymous.status_code, wrong.status_code) == (401, 401)
            for bad in ({"ids": []}, {"ids": ["seven"]}):
                refused = await client.post("/api/dead-letters/redeliver", json=bad, headers=BEARER)
                assert refused.status_code == 400, bad
            assert [r.id for r in await list_dead_letters(pg_conn, world.schema)] == world.dead_ids
            with logged("pgbus.dashboard") as records:
                ok = await client.post(
                    "/api/dead-letters/redeliver", json={"ids": [dead_id]}, headers=BEARER
                )
        assert ok.status_code == 200
        assert ok.json()["outcome"] == {str(dead_id): "notify"}
        assert await asyncio.wait_for(heard.get(), 5) == "not json at all"
    finally:
        await listener.close()
    remaining = [r.id for r in await list_dead_letters(pg_conn, world.schema)]
    assert dead_id not in remaining
    lines = [r.getMessage() for r in records]
    assert any("dead-letters/redeliver" in line and str(dead_id) in line for line in lines)
    assert not any(TOKEN in line for line in lines)


async def test_read_only_and_tokenless_dashboards_change_nothing(world, dashboard, pg_conn):
    """--read-only refuses changes even with the token; without a token nothing can change."""
    body = {"ids": world.dead_ids}
    async with dashboard(read_only=True) as url, httpx.AsyncClient(base_url=url) as client:
        refused = await client.post("/api/dead-letters/discard", json=body, headers=BEARER)
        login = await client.post("/login", data={"token": TOKEN})
    assert refused.status_code == 403
    assert "read-only" in refused.json()["error"]
    assert login.status_code == 403
    async with dashboard(token=None) as url, httpx.AsyncClient(base_url=url) as client:
        refused = await client.post("/api/dead-letters/discard", json=body, headers=BEARER)
    assert refused.status_code == 403
    assert len(await list_dead_letters(pg_conn, world.schema)) == len(world.dead_ids)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


async def test_login_session_needs_same_origin_and_csrf(world, dashboard, pg_conn):
    """A login cookie is HttpOnly and SameSite=Strict; its forms need same origin and CSRF token."""
    dead_id = world.dead_ids[1]
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/login", data={"token": "wrong"})).status_code == 401
        login = await client.post("/login", data={"token": TOKEN, "next": "/dead-letters"})
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert TOKEN.lower() not in cookie
        csrf = _csrf((await client.get("/dead-letters")).text)
        form = {"ids": str(dead_id), "csrf": csrf}
        action = "/actions/dead-letters/redeliver"
        no_csrf = await client.post(action, data={"ids": str(dead_id)}, headers={"Origin": url})
        cross_site = await client.post(
            action, data=form, headers={"Origin": "https://evil.example"}
        )
        fetch_cross = await client.post(action, data=form, headers={"Sec-Fetch-Site": "cross-site"})
        assert (no_csrf.status_code, cross_site.status_code, fetch_cross.status_code) == (
            403,
            403,
            403,
        )
        assert len(await list_dead_letters(pg_conn, world.schema)) == 3
        done = await client.post(action, data=form, headers={"Origin": url})
        assert done.status_code == 303
        assert "redelivered" not in done.headers["location"]  # a key, never the text
        shown = await client.get(done.headers["location"])
        assert f"redelivered dead letters [{dead_id}]" in shown.text
        forged = await client.get("/dead-letters?done=Session+expired:+visit+evil.example")
        assert "flash" not in forged.text  # no notice: the key is unknown
        await client.post("/logout", headers={"Origin": url})
        after = await client.post(action, data=form, headers={"Origin": url})
        assert after.status_code == 401
    assert dead_id not in [r.id for r in await list_dead_letters(pg_conn, world.schema)]


async def test_discard_asks_for_confirmation(world, dashboard, pg_conn):
    """Discarding from a form shows a confirmation first, and deletes only once confirmed."""
    chosen = world.dead_ids[:2]
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        await client.post("/login", data={"token": TOKEN})
        csrf = _csrf((await client.get("/dead-letters")).text)
        form = {"csrf": csrf, "ids": [str(i) for i in chosen]}
        ask = await client.post("/actions/dead-letters/discard", data=form, headers={"Origin": url})
        assert ask.status_code == 200
        assert 'name="confirmed" value="yes"' in ask.text
        assert len(await list_dead_letters(pg_conn, world.schema)) == 3
        done = await client.post(
            "/actions/dead-letters/discard",
            data={**form, "confirmed": "yes"},
            headers={"Origin": url},
        )
        assert done.status_code == 303
    assert [r.id for r in await list_dead_letters(pg_conn, world.schema)] == [world.xss_id]
    gone = await pg_conn.fetchval(
        f'SELECT count(*) FROM "{world.schema}".dead_letters WHERE id = ANY($1::bigint[])', chosen
    )
    assert gone == 0


async def test_seek_and_drop_a_durable_subscription(world, dashboard, pg_conn):
    """Seek moves a group (bad positions are refused); drop deletes it; unknown names are 404."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url, headers=BEARER) as client:
        bad = await client.post("/api/durable/seek", json={"name": "billing", "to": "yesterday"})
        assert bad.status_code == 400
        moved = await client.post("/api/durable/seek", json={"name": "billing", "to": "latest"})
        assert moved.status_code == 200
        [sub] = await list_subscriptions(pg_conn, world.schema)
        assert sub.backlog == 0
        missing = await client.post("/api/durable/drop", json={"name": "nobody"})
        assert missing.status_code == 404
        world.release.set()  # let the member go before its group is dropped
        dropped = await client.post("/api/durable/drop", json={"name": "billing"})
        assert dropped.status_code == 200
    assert await list_subscriptions(pg_conn, world.schema) == []


async def test_health_reports_the_doctor_checks(world, dashboard):
    """The health API and page run `pgbus doctor`'s checks against the database."""
    async with dashboard() as url, httpx.AsyncClient(base_url=url) as client:
        data = (await client.get("/api/health")).json()
        page = await client.get("/health")
    assert data["ok"] is True
    names = [check["name"] for check in data["checks"]]
    assert {"connect", "LISTEN", "notify queue", "durable schema"} <= set(names)
    assert 'class="status-ok" data-check="LISTEN"' in page.text


async def test_cli_refuses_a_public_host_without_token(pg_dsn):
    """`pgbus dashboard --host 0.0.0.0` without a token exits with a clear error."""
    status, out = await run_cli("--dsn", pg_dsn, "dashboard", "--host", "0.0.0.0")  # noqa: S104
    assert status == 1
    assert "without a token" in out
    assert "--token" in out


async def test_cli_names_the_extra_when_it_is_missing(pg_dsn):
    """Without the dashboard extra, `pgbus dashboard` says which extra to install."""
    code = (
        "import sys; sys.modules['starlette'] = None; sys.argv = ['pgbus', 'dashboard'];"
        " from pgbus.cli import main; main()"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=cli_env(PGBUS_DSN=pg_dsn),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "pip install 'pgbus[dashboard]'" in out.decode()


@pytest.mark.parametrize("read_only", [False, True])
async def test_cli_serves_the_dashboard(world, spawn, read_only):
    """`pgbus dashboard` serves the pages on the port it was given, and logs what it changed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--dsn", world.dsn, "dashboard", "--port", str(port), "--schema", world.schema]
    proc = await spawn(*args, *(["--read-only"] if read_only else []), PGBUS_DASHBOARD_TOKEN=TOKEN)
    try:
        await proc.until(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(20):
                while True:
                    try:
                        response = await client.get("/api/dead-letters")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            assert len(response.json()) == 3
            result = await client.post(
                "/api/dead-letters/redeliver", json={"ids": [world.dead_ids[0]]}, headers=BEARER
            )
            rebound = await client.get("/api/dead-letters", headers={"Host": "evil.example"})
        assert rebound.status_code == 400  # a loopback dashboard answers loopback names only
        assert result.status_code == (403 if read_only else 200)
        line = await proc.until("dashboard dead-letters/redeliver")
        assert ("refused" in line) is read_only
        assert TOKEN not in line
    finally:
        await proc.stop()
