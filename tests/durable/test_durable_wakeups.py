"""The wake-up path of durable publishes: no NOTIFY in the writer's transaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from _helpers import Collector, Process, cli_env, ticket_type

from pgbus.durable import DurablePlugin

if TYPE_CHECKING:
    import pgbus

PUBLISHER = Path(__file__).with_name("_publisher.py")


async def _listen(
    dsn: str, channel: str
) -> tuple[asyncpg.Connection, asyncio.Queue[tuple[int, str]]]:
    """A raw LISTEN connection and the queue of its ``(pid, payload)`` notifications."""
    conn = await asyncpg.connect(dsn)
    got: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    await conn.add_listener(channel, lambda _c, pid, _ch, payload: got.put_nowait((pid, payload)))
    return conn, got


def _subscribed(
    durable_bus: Any, channel: str, name: str
) -> tuple[Any, Collector, pgbus.Bus, DurablePlugin]:
    """A durable bus with a subscription ``name`` collecting a ticket type of ``channel``."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable=name)(got)
    plugin = bus.plugins.get("durable")
    assert isinstance(plugin, DurablePlugin)
    return ticket, got, bus, plugin


async def test_the_writers_transaction_sends_no_notify(durable_bus, sql, channel: str):
    """A transactional durable publish is notified after the commit by another backend."""
    ticket = ticket_type(channel)
    bus: pgbus.Bus = durable_bus()
    listener, got = await _listen(bus.dsn, channel)
    try:
        async with sql.transaction():
            event_id = await bus.publish(ticket(n=1), connection=sql)
        pid, payload = await asyncio.wait_for(got.get(), 10)
    finally:
        await listener.close()
        await bus.stop()
    assert json.loads(payload)["id"] == event_id
    assert pid != sql.get_server_pid()


async def test_a_commit_two_seconds_later_is_handled_within_a_second(
    durable_bus, sql, channel: str
):
    """The caller commits 2 s after publish(connection=): handled within 1 s of the commit."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus()  # the poll backstop is 60 s away
    bus.subscribe(ticket, durable="late")(got)
    async with bus:
        async with sql.transaction():
            await bus.publish(ticket(n=1), connection=sql)
            await asyncio.sleep(2.0)  # the caller's own work before it commits
        committed = time.monotonic()
        await got.wait_for(1, timeout=1.0)
        assert time.monotonic() - committed < 1.0


async def test_the_callers_commit_is_seen_on_its_connection(durable_bus, sql, channel: str):
    """The commit of the caller's connection is seen in this process: one look-up.

    The server is asked once, after the connection left its transaction, not polled
    while the caller's transaction stays open.
    """
    ticket, got, bus, plugin = _subscribed(durable_bus, channel, "seen")
    async with bus:
        async with sql.transaction():
            await bus.publish(ticket(n=1), connection=sql)
            await asyncio.sleep(0.5)  # the caller's own work before it commits
        await got.wait_for(1, timeout=10)
    assert plugin.wakeups.sent == 1
    assert plugin.wakeups.lookups == 1


async def test_an_asyncpg_commit_is_signalled_not_looked_for(durable_bus, pg_dsn, channel: str):
    """An asyncpg connection tells of the caller's commit as it returns (a query logger):
    handled with no look at the connection nor the server due for a minute; the logger
    is gone before the connection goes back to its pool."""
    ticket, got, bus, plugin = _subscribed(durable_bus, channel, "signalled")
    plugin.wakeups.tick = plugin.wakeups.probe_wait = 60.0
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        async with bus:
            async with pool.acquire() as conn, conn.transaction():
                await bus.publish(ticket(n=1), connection=conn)
                await asyncio.sleep(0.2)  # the caller's own work before it commits
            await got.wait_for(1, timeout=5.0)
            async with pool.acquire() as conn:  # the same connection, back from the pool
                assert not conn._con._query_loggers
    finally:
        await pool.close()
    assert plugin.wakeups.sent == 1


async def test_commits_faster_than_the_tick_are_looked_at_not_signalled(
    durable_bus, pg_dsn, channel: str
):
    """Transactions publishing more often than the tick looks add no query logger each:
    the tick sees their commits; every event is handled, and the last one signalled
    again once they come slowly."""
    ticket, got, bus, plugin = _subscribed(durable_bus, channel, "busy")
    plugin.wakeups.busy_gap = 0.005  # a margin for a slow machine: 8 writers beat it
    writers, each = 8, 25
    pool = await asyncpg.create_pool(pg_dsn, min_size=writers, max_size=writers)

    async def writer(first: int) -> None:
        async with pool.acquire() as conn:
            for n in range(first, first + each):
                async with conn.transaction():
                    await bus.publish(ticket(n=n), connection=conn)

    try:
        async with bus:
            await asyncio.gather(*(writer(w * each) for w in range(writers)))
            await got.wait_for(writers * each, timeout=20)
            busy = plugin.wakeups.signalled
            await asyncio.sleep(0.5)  # then a publish alone: its commit is signalled
            async with pool.acquire() as conn, conn.transaction():
                await bus.publish(ticket(n=-1), connection=conn)
            await got.wait_for(writers * each + 1, timeout=5)
    finally:
        await pool.close()
    assert sorted(e.n for e in got.items) == [-1, *range(writers * each)]
    assert busy < writers * each / 2
    assert plugin.wakeups.signalled == busy + 1


async def test_an_aborted_publish_is_never_notified(durable_bus, sql, channel: str):
    """A rolled-back transactional publish sends no wake-up; the next publish does."""
    ticket = ticket_type(channel)
    bus: pgbus.Bus = durable_bus()
    listener, got = await _listen(bus.dsn, channel)
    try:
        tx = sql.transaction()
        await tx.start()
        await bus.publish(ticket(n=1), connection=sql)
        await tx.rollback()
        event_id = await bus.publish(ticket(n=2))
        _, payload = await asyncio.wait_for(got.get(), 10)
        await bus.stop()
    finally:
        await listener.close()
    assert json.loads(payload)["id"] == event_id
    assert got.empty()
    plugin = bus.plugins.get("durable")
    assert isinstance(plugin, DurablePlugin)
    assert plugin.wakeups.sent == 1


async def test_a_publish_in_a_rolled_back_savepoint_is_never_notified(
    durable_bus, sql, channel: str
):
    """The caller's transaction commits, a savepoint holding one publish was rolled back:
    only the other event's wake-up goes out (a plain subscriber must not get the undone one)."""
    ticket, got, bus, _ = _subscribed(durable_bus, channel, "savepoint")
    listener, notified = await _listen(bus.dsn, channel)
    try:
        async with bus:
            async with sql.transaction():
                with contextlib.suppress(LookupError):
                    async with sql.transaction():  # a savepoint
                        await bus.publish(ticket(n=1), connection=sql)
                        raise LookupError
                kept = await bus.publish(ticket(n=2), connection=sql)
            _, payload = await asyncio.wait_for(notified.get(), 10)
            await got.wait_for(1)
            await bus.publish(ticket(n=3))  # a later wake-up: the undone one would be before
            _, last = await asyncio.wait_for(notified.get(), 10)
            await got.wait_for(2)
    finally:
        await listener.close()
    assert json.loads(payload)["id"] == kept
    assert json.loads(last)["data"]["n"] == 3
    assert [e.n for e in got.items] == [2, 3]


async def test_a_wake_up_sent_while_the_listener_is_down_is_made_up(
    durable_bus, pg_dsn: str, tcp_proxy, sql, channel: str
):
    """The listener drops between the commit and the wake-up: its reconnect delivers the event."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus(tcp_proxy.dsn_for(pg_dsn))  # no poll backstop (60 s)
    bus.subscribe(ticket, durable="gap")(got)
    listener, woke = await _listen(pg_dsn, channel)
    try:
        async with bus:
            await bus.publish(ticket(n=0))
            await got.wait_for(1)
            await woke.get()
            async with sql.transaction():
                await bus.publish(ticket(n=1), connection=sql)
                tcp_proxy.refuse = True  # new connections only: the pools keep theirs
                await sql.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
            await asyncio.wait_for(woke.get(), 10)  # the wake-up went out: the bus missed it
            tcp_proxy.refuse = False
            await got.wait_for(2)
    finally:
        await listener.close()
    assert [e.n for e in got.items] == [0, 1]


async def test_a_publisher_killed_before_its_wake_up_is_made_up_by_the_poll(
    durable_bus, pg_dsn: str, schema: str, channel: str
):
    """A publisher SIGKILLed after its commit, before its wake-up: the poll delivers it."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus(plugin={"poll_interval": 0.3})
    bus.subscribe(ticket, durable="orphan")(got)
    async with bus:
        proc = Process(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(PUBLISHER),
                pg_dsn,
                schema,
                channel,
                "7",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=cli_env(),
            )
        )
        assert (await proc.line()).strip() == "committed"
        code, _, _ = await proc.finish()
        [event] = await got.wait_for(1, timeout=10)
    assert code == -9
    assert event.n == 7


async def test_committed_and_aborted_publishes_in_one_round(durable_bus, pg_dsn, channel: str):
    """Committed transactions' wake-ups go out in publish order, an aborted one's never.

    The look-up of the transactions and the NOTIFYs of the committed ones are one
    statement: what it sends must be exactly what committed.
    """
    ticket = ticket_type(channel)
    bus: pgbus.Bus = durable_bus()
    listener, got = await _listen(bus.dsn, channel)
    one, two = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        kept, lost = one.transaction(), two.transaction()
        await kept.start()
        await lost.start()
        ids = [await bus.publish(ticket(n=1), connection=one)]
        await bus.publish(ticket(n=2), connection=two)
        ids.append(await bus.publish(ticket(n=3), connection=one))
        await lost.rollback()
        await kept.commit()
        ids.append(await bus.publish(ticket(n=4)))
        payloads = [(await asyncio.wait_for(got.get(), 10))[1] for _ in range(3)]
        await bus.stop()
    finally:
        await listener.close()
        await one.close()
        await two.close()
    assert [json.loads(p)["id"] for p in payloads] == ids
    assert got.empty()
    plugin = bus.plugins.get("durable")
    assert isinstance(plugin, DurablePlugin)
    assert (plugin.wakeups.sent, plugin.wakeups.dropped) == (3, 1)
