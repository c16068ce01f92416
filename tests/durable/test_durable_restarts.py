"""Durable retries, delayed events, replays and responders across a real process restart.

Each test runs its consumer in a process of its own (``_restart_app.py``) and kills it
with SIGKILL, so nothing of it survives but what it wrote to the database.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _helpers import Process, run_cli, ticket_type

import pgbus

if TYPE_CHECKING:
    import asyncpg

APP = str(Path(__file__).with_name("_restart_app.py"))


class App:
    """The app's process, and the handler calls it reported before it said "ready"."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.early = [line for line in process.seen if line != "ready\n"]

    async def calls(self, n: int) -> list[tuple[str, int, int, bool, float]]:
        """The next ``n`` handler calls: outcome, n, attempt, redelivered, at."""
        got = []
        for _ in range(n):
            line = self.early.pop(0) if self.early else await self.process.line(timeout=20)
            outcome, number, attempt, redelivered, at = line.split()
            got.append((outcome, int(number), int(attempt), redelivered == "True", float(at)))
        return got


async def start_app(spawn: Any, *args: str, **env: str) -> App:
    """Start the app with ``args`` (DSN SCHEMA CHANNEL NAME [START]) once it listens."""
    process: Process = await spawn(APP, *args, python=True, **env)
    await process.until("ready", stream="stdout")
    return App(process)


async def kill(app: App) -> None:
    app.process.signal(signal.SIGKILL)
    await app.process.proc.wait()


async def test_a_nack_persisted_before_a_sigkill_is_retried_after_the_restart_at_its_time(
    spawn, durable_bus, sql: asyncpg.Connection, pg_dsn, schema, channel
):
    """A retry nacked (and persisted) before SIGKILL is handled by the next process, as
    attempt 2, no earlier than its delay."""
    ticket = ticket_type(channel)
    args = (pg_dsn, schema, channel, "retrier")
    first = await start_app(spawn, *args, APP_NACK="2.0")
    publisher: pgbus.Bus = durable_bus()
    await publisher.publish(ticket(n=7))
    [(outcome, _, attempt, _, nacked_at)] = await first.calls(1)
    assert (outcome, attempt) == ("nacked", 1)
    waiting: list[int] = []

    async def persisted() -> None:
        waiting[:] = [
            await sql.fetchval(
                f'SELECT count(*) FROM "{schema}".batches WHERE attempt = 2 AND not_before > now()'
            )
        ]

    async def retry_row() -> None:
        while not waiting or waiting[0] != 1:
            await persisted()

    await asyncio.wait_for(retry_row(), 10)
    await kill(first)
    second = await start_app(spawn, *args, APP_NACK="2.0")
    [(outcome, n, attempt, redelivered, handled_at)] = await second.calls(1)
    assert (outcome, n, attempt, redelivered) == ("handled", 7, 2, True)
    assert handled_at >= nacked_at + 2.0


async def test_a_delayed_publish_is_handled_after_its_consumer_was_killed_and_restarted(
    spawn, durable_bus, pg_dsn, schema, channel
):
    """An event published for later, whose only consumer is SIGKILLed before it is due, is
    handled at its time by the consumer's next process."""
    ticket = ticket_type(channel)
    args = (pg_dsn, schema, channel, "later")
    first = await start_app(spawn, *args)
    publisher: pgbus.Bus = durable_bus()
    published_at = time.time()
    await publisher.publish(ticket(n=1), delay=2.0)
    await publisher.stop()  # no bus of the test's moves it into the journal
    await kill(first)
    second = await start_app(spawn, *args)
    [(outcome, n, attempt, _, handled_at)] = await second.calls(1)
    assert (outcome, n, attempt) == ("handled", 1, 1)
    assert handled_at >= published_at + 2.0


async def test_start_positions_and_a_seek_replay_after_a_restart(
    spawn, durable_bus, pg_dsn, schema, channel
):
    """A new subscription started at "earliest" in a fresh process gets the journal; after
    SIGKILL and `pgbus durable seek --to earliest`, its next process replays it all."""
    ticket = ticket_type(channel)
    publisher: pgbus.Bus = durable_bus()
    await publisher.publish_many([ticket(n=i) for i in range(3)])
    args = (pg_dsn, schema, channel, "replayer")
    first = await start_app(spawn, *args, "earliest")
    assert [c[1] for c in await first.calls(3)] == [0, 1, 2]
    await publisher.publish(ticket(n=3))
    assert [c[1] for c in await first.calls(1)] == [3]
    await kill(first)
    code, out = await run_cli(
        "--dsn", pg_dsn, "durable", "--schema", schema, "seek", "replayer", "--to", "earliest"
    )
    assert code == 0, out
    second = await start_app(spawn, *args)  # start= only matters for a new subscription
    replayed = await second.calls(4)
    assert [c[1] for c in replayed] == [0, 1, 2, 3]
    assert [c[3] for c in replayed] == [False] * 4  # a replay is a first delivery again
    late = await start_app(spawn, pg_dsn, schema, channel, "latecomer")  # start="latest"
    await publisher.publish(ticket(n=4))
    assert [c[1] for c in await late.calls(1)] == [4]


async def test_a_durable_responder_answers_a_request_sent_while_it_was_down(
    spawn, durable_bus, pg_dsn, schema, channel
):
    """A durable subscription answers bus.request; one SIGKILLed and restarted answers a
    request that was sent while it was down, within the request's timeout."""
    ticket = ticket_type(channel)
    args = (pg_dsn, schema, channel, "responder")
    first = await start_app(spawn, *args)
    requester: pgbus.Bus = durable_bus()
    async with requester:
        reply = await requester.request(ticket(n=1), timeout=10)
        assert reply["n"] == 1
        assert reply["pid"] == first.process.proc.pid
        await kill(first)
        sent = asyncio.Event()

        class Sent:
            @pgbus.hookimpl
            def pgbus_on_published(self, outgoing: Any) -> None:
                sent.set()

        requester.plugins.register(Sent())
        waiting = asyncio.create_task(requester.request(ticket(n=2), timeout=30))
        await asyncio.wait_for(sent.wait(), 10)  # journaled while no responder runs
        second = await start_app(spawn, *args)
        reply = await asyncio.wait_for(waiting, 30)
    assert reply == {"n": 2, "pid": second.process.proc.pid}
