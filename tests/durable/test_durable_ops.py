"""Durable mode operations: dead letters (table, CLI, redelivery) and journal retention."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from _helpers import Collector, run_cli, ticket_type

import pgbus
from pgbus.durable import list_dead_letters, redeliver

# -- dead letters ---------------------------------------------------------------------


async def test_dead_letter_listed_and_redelivered(durable_bus, pg_dsn, sql, schema, channel):
    """`pgbus dead-letters` lists a durable dead letter and redelivers it to its group only."""
    ticket = ticket_type(channel)
    got = Collector()
    other = Collector()
    failing = {"on": True}

    async def flaky(event: Any) -> None:
        if failing["on"] and event.n == 1:
            msg = "down"
            raise RuntimeError(msg)
        await got(event)

    bus: pgbus.Bus = durable_bus(plugin={"poll_interval": 0.2})
    bus.subscribe(ticket, durable="flaky", retry=pgbus.Retry(attempts=1))(flaky)
    bus.subscribe(ticket, durable="other", name="other")(other)
    async with bus:
        await bus.publish_many([ticket(n=0), ticket(n=1), ticket(n=2)])
        await got.wait_for(2)
        await other.wait_for(3)
        code, out = await run_cli(
            "--dsn", pg_dsn, "dead-letters", "--schema", schema, "list", "--json"
        )
        assert code == 0, out
        [listed] = json.loads(out)
        assert listed["subscription"] == "flaky"
        assert "RuntimeError: down" in listed["error"]
        failing["on"] = False
        code, out = await run_cli(
            "--dsn", pg_dsn, "dead-letters", "--schema", schema, "redeliver", str(listed["id"])
        )
        assert code == 0, out
        assert "redelivered (inbox)" in out
        await got.wait_for(3)
    assert [e.n for e in got.items] == [0, 2, 1]
    assert [e.n for e in other.items] == [0, 1, 2]
    assert await list_dead_letters(sql, schema) == []
    assert len(await list_dead_letters(sql, schema, include_redelivered=True)) == 1


async def test_a_dead_letter_redelivered_before_its_batch_is_acked_is_handled(
    durable_bus, sql, schema, channel
):
    """A redelivery made while the failed event's batch is still unacked is not lost.

    The ack of that batch names the same journal id as the redelivered one-event batch;
    it must remove only what this member claimed, not the new batch.
    """
    ticket = ticket_type(channel)
    got = Collector()
    failing = {"on": True}

    async def flaky(event: Any) -> None:
        if event.n == 1 and failing["on"]:
            msg = "down"
            raise RuntimeError(msg)
        if event.n == 2:  # event 1 is dead-lettered by now; its batch is not acked yet
            [dead] = await list_dead_letters(sql, schema)
            failing["on"] = False
            assert await redeliver(sql, [dead.id], schema) == {dead.id: "inbox"}
        await got(event)

    bus: pgbus.Bus = durable_bus()  # poll_interval 60 s: only the wake-up finds the batch
    bus.subscribe(ticket, durable="flaky", retry=pgbus.Retry(attempts=1))(flaky)
    async with bus:
        await bus.publish_many([ticket(n=1), ticket(n=2)])
        await got.wait_for(1)
        bus.plugins.get("durable").consumers["flaky"].wake()
        await got.wait_for(2)
    assert [e.n for e in got.items] == [2, 1]


async def test_redeliver_unknown_id_reports_it(sql, schema):
    """Redelivering an id that does not exist says so and changes nothing."""
    assert await redeliver(sql, [424242], schema) == {424242: "not found"}


async def test_plain_dead_letters_are_stored(durable_bus, sql, schema, channel):
    """On a durable bus, a plain subscription's dead letters are stored in the table too."""
    ticket = ticket_type(channel)
    stored = asyncio.Event()

    async def broken(event: Any) -> None:
        msg = f"bad {event.n}"
        raise ValueError(msg)

    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, name="plain", retry=pgbus.Retry(attempts=1))(broken)

    @pgbus.hookimpl
    def pgbus_on_dead_letter(dead_letter: Any) -> None:
        stored.set()

    class Probe:
        pass

    probe = Probe()
    probe.pgbus_on_dead_letter = pgbus_on_dead_letter  # type: ignore[attr-defined]
    bus.plugins.register(probe, name="probe")
    async with bus:
        await bus.publish(ticket(n=7))
        await asyncio.wait_for(stored.wait(), 10)
    # stop() returned: the handler's dead-letter hooks, the table insert included, are done
    [row] = await list_dead_letters(sql, schema)
    assert row.subscription == "plain"
    assert row.error == "ValueError: bad 7"
    assert row.journal_id is None


async def test_undecodable_journal_row_is_dead_lettered(durable_bus, sql, schema, channel):
    """A journal row its model rejects is dead-lettered with its raw payload; the next goes on."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="strict")(got)
    async with bus:
        bad = json.dumps({"v": 1, "id": "bad-1", "type": "Ticket", "ts": 0, "data": {"n": "x"}})
        await sql.execute(
            f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'
            " VALUES ($1, 'bad-1', 'Ticket', $2)",
            channel,
            bad,
        )
        await bus.publish(ticket(n=5))
        await got.wait_for(1)
    assert [e.n for e in got.items] == [5]
    [row] = await list_dead_letters(sql, schema)
    assert row.subscription == "strict"
    assert row.payload == bad
    assert row.event_id == "bad-1"


# -- retention ------------------------------------------------------------------------


async def test_prune_waits_for_every_subscription(durable_bus, sql, schema, channel):
    """Journal rows are pruned only once every durable subscription has handled them."""
    ticket = ticket_type(channel)
    lagging: pgbus.Bus = durable_bus()
    lagging.subscribe(ticket, durable="lagging")(Collector())
    async with lagging:  # registers the subscription, then goes away
        pass
    got = Collector()
    bus: pgbus.Bus = durable_bus(plugin={"prune_batch": 3})
    bus.subscribe(ticket, durable="fast")(got)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(10)])
        await got.wait_for(10)
        plugin = bus.plugins.get("durable")
        assert await plugin.prune() == 0
        assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal') == 10
        late = Collector()
        again: pgbus.Bus = durable_bus()
        again.subscribe(ticket, durable="lagging")(late)
        async with again:
            await late.wait_for(10)
        assert await plugin.prune() == 10
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal') == 0


async def test_prune_by_age_ignores_lagging_subscriptions(durable_bus, sql, schema, channel):
    """Rows older than the retention age are pruned even if a subscription never took them."""
    ticket = ticket_type(channel)
    lagging: pgbus.Bus = durable_bus()
    lagging.subscribe(ticket, durable="lagging")(Collector())
    async with lagging:
        pass
    bus: pgbus.Bus = durable_bus(plugin={"retention": 3600.0})
    await bus.publish_many([ticket(n=i) for i in range(5)])
    journal = f'"{schema}".journal'
    await sql.execute(
        f"UPDATE {journal} SET created_at = now() - interval '2 hours'"
        f" WHERE id IN (SELECT id FROM {journal} ORDER BY id LIMIT 3)"
    )
    plugin = bus.plugins.get("durable")
    assert await plugin.prune() == 3
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal') == 2
    late = Collector()
    again: pgbus.Bus = durable_bus()
    again.subscribe(ticket, durable="lagging")(late)
    async with again:
        await late.wait_for(2)
    assert [e.n for e in late.items] == [3, 4]
