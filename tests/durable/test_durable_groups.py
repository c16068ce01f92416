"""Consumer groups: members with one durable name share the work, and survive a member's death."""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import ticket_type

if TYPE_CHECKING:
    import pgbus

MEMBER = Path(__file__).with_name("_member.py")


@pytest.mark.both_buses
async def test_two_members_handle_each_event_once(durable_bus, channel: str):
    """Two buses with the same durable name: every event is handled by exactly one of them."""
    ticket = ticket_type(channel)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    done = asyncio.Event()
    total = 2000

    def handler(member: str) -> Any:
        async def handle(event: Any) -> None:
            seen[member].append(event.n)
            await asyncio.sleep(0)
            if len(seen["a"]) + len(seen["b"]) >= total:
                done.set()

        return handle

    a: pgbus.Bus = durable_bus(plugin={"batch_size": 10})
    b: pgbus.Bus = durable_bus(plugin={"batch_size": 10})
    a.subscribe(ticket, durable="workers")(handler("a"))
    b.subscribe(ticket, durable="workers")(handler("b"))
    async with a, b:
        for start in range(0, total, 50):
            await a.publish_many([ticket(n=i) for i in range(start, start + 50)])
        await asyncio.wait_for(done.wait(), 30)
    assert sorted(seen["a"] + seen["b"]) == list(range(total))
    assert seen["a"]
    assert seen["b"]
    assert seen["a"] == sorted(seen["a"])  # each member's share is in order
    assert seen["b"] == sorted(seen["b"])


class Member:
    """A group member in its own process; what it handled arrives on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.handled: list[int] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, *args: str) -> Member:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(MEMBER),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", line
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.handled.append(int(line))
            self.changed.set()

    async def wait_for(self, n: int, timeout: float = 30.0) -> None:
        async def until() -> None:
            while len(self.handled) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 30)
        await self.reader


@pytest.mark.parametrize("batch", [(), ("10",)], ids=["one-by-one", "batch-handler"])
async def test_killed_member_work_goes_to_the_other(
    durable_bus, pg_dsn, schema, channel, batch: tuple[str, ...]
):
    """SIGKILL one of two member processes midway: the other handles the rest after the lease
    (batch handlers too: a dead member's batches are handled again whole by the other)."""
    ticket = ticket_type(channel)
    total = 2000
    a = await Member.spawn(pg_dsn, schema, channel, "group", *batch)
    b = await Member.spawn(pg_dsn, schema, channel, "group", *batch)
    try:
        publisher: pgbus.Bus = durable_bus()
        for start in range(0, total, 100):
            await publisher.publish_many([ticket(n=i) for i in range(start, start + 100)])
        await a.wait_for(200)
        a.proc.send_signal(signal.SIGKILL)
        await a.proc.wait()
        await a.reader

        async def all_handled() -> None:
            while set(a.handled) | set(b.handled) != set(range(total)):
                b.changed.clear()
                await b.changed.wait()

        await asyncio.wait_for(all_handled(), 60)
    finally:
        for member in (a, b):
            if member.proc.returncode is None:
                await member.close()
    counts_b = collections.Counter(b.handled)
    assert max(counts_b.values()) == 1  # the survivor never handled one twice
    assert max(collections.Counter(a.handled).values()) == 1
    # The only events handled by both are those the killed member had handled but not yet
    # acked: at most one claimed batch (batch_size=20 in _member.py).
    assert len(set(a.handled) & set(b.handled)) <= 20


async def test_three_members_one_killed_every_event_handled(durable_bus, pg_dsn, schema, channel):
    """SIGKILL one of three member processes midway: the others handle every event, each
    survivor none twice, and only the dead member's unacked batch is handled again."""
    ticket = ticket_type(channel)
    total = 3000
    members = [await Member.spawn(pg_dsn, schema, channel, "trio") for _ in range(3)]
    victim, survivors = members[0], members[1:]
    try:
        publisher: pgbus.Bus = durable_bus()
        for start in range(0, total, 100):
            await publisher.publish_many([ticket(n=i) for i in range(start, start + 100)])
        await victim.wait_for(100)
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        await victim.reader

        def handled() -> set[int]:
            return {n for m in members for n in m.handled}

        async def all_handled() -> None:
            while handled() != set(range(total)):
                for m in survivors:
                    m.changed.clear()
                waits = [asyncio.create_task(m.changed.wait()) for m in survivors]
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()

        await asyncio.wait_for(all_handled(), 60)
    finally:
        for member in members:
            if member.proc.returncode is None:
                await member.close()
    for member in members:
        assert max(collections.Counter(member.handled).values()) == 1
    twice = collections.Counter(n for m in members for n in m.handled)
    assert sum(1 for c in twice.values() if c > 1) <= 20  # one batch (batch_size=20)
    assert set(survivors[0].handled).isdisjoint(survivors[1].handled)


@pytest.mark.both_buses
async def test_lease_is_renewed_while_a_handler_runs(durable_bus, channel: str):
    """A handler that runs longer than the lease keeps its claim: no other member takes it."""
    ticket = ticket_type(channel)
    handled: list[str] = []
    finished = asyncio.Event()
    settings = {"lease": 0.3, "poll_interval": 0.05}

    def member(name: str) -> Any:
        async def handle(event: Any) -> None:
            handled.append(name)
            await asyncio.sleep(1.5)  # five leases
            finished.set()

        return handle

    a: pgbus.Bus = durable_bus(plugin=settings)
    b: pgbus.Bus = durable_bus(plugin=settings)
    a.subscribe(ticket, durable="slow")(member("a"))
    b.subscribe(ticket, durable="slow")(member("b"))
    async with a, b:
        await a.publish(ticket(n=1))
        await asyncio.wait_for(finished.wait(), 10)
    assert len(handled) == 1


@pytest.mark.both_buses
async def test_key_ordered_group_never_handles_a_key_twice_at_once(durable_bus, channel: str):
    """In a key-ordered group, a key is handled by one member at a time, in publish order."""
    ticket = ticket_type(channel)
    total = 300
    active: set[int] = set()
    overlaps: list[int] = []
    by_key: dict[int, list[int]] = collections.defaultdict(list)
    members: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    def handler(member: str) -> Any:
        async def handle(event: Any) -> None:
            key = event.n % 3
            if key in active:
                overlaps.append(event.n)
            active.add(key)
            await asyncio.sleep(0)  # let the other member run meanwhile
            by_key[key].append(event.n)
            members[member] += 1
            active.discard(key)
            if sum(members.values()) >= total:
                done.set()

        return handle

    buses = [durable_bus(plugin={"batch_size": 5, "poll_interval": 0.2}) for _ in "ab"]
    for bus, member in zip(buses, "ab", strict=True):
        bus.subscribe(ticket, durable="keyed", concurrency=4, key=lambda e: e.n % 3)(
            handler(member)
        )
    async with buses[0], buses[1]:
        for start in range(0, total, 50):
            await buses[0].publish_many([ticket(n=i) for i in range(start, start + 50)])
        await asyncio.wait_for(done.wait(), 30)
    assert overlaps == []
    for key, ns in by_key.items():
        assert ns == sorted(ns) == list(range(key, total, 3))


async def test_key_ordered_group_waits_for_a_dead_members_batch(
    durable_bus, sql, schema: str, channel: str
):
    """A key-ordered member takes no later batch while a dead member's lease runs: order kept."""
    ticket = ticket_type(channel)
    s = f'"{schema}"'
    publisher = durable_bus()
    await publisher.publish_many([ticket(n=i) for i in range(6)])
    await publisher.stop()
    # What a member that died holding the first batch leaves: its claim, for 1 s more.
    await sql.execute(
        f"INSERT INTO {s}.subscriptions (name, channels, types, snap)"
        " VALUES ('keyed', $1, NULL, pg_current_snapshot())",
        [channel],
    )
    ids = await sql.fetchval(f"SELECT array_agg(id ORDER BY id) FROM {s}.journal")
    await sql.execute(
        f"INSERT INTO {s}.batches (subscription, journal_ids, claimed_by, claimed_until,"
        " deliveries) VALUES ('keyed', $1, 'dead', now() + interval '1 second', 1)",
        ids[:3],
    )
    await sql.execute(
        f"INSERT INTO {s}.batches (subscription, journal_ids) VALUES ('keyed', $1)", ids[3:]
    )
    handled: list[int] = []
    done = asyncio.Event()

    async def handle(event: Any) -> None:
        handled.append(event.n)
        if len(handled) == 6:
            done.set()

    bus = durable_bus(plugin={"poll_interval": 0.2})
    bus.subscribe(ticket, durable="keyed", concurrency=4, key=lambda e: e.n % 2)(handle)
    async with bus:
        await asyncio.wait_for(done.wait(), 10)
    assert sorted(handled[:3]) == [0, 1, 2]  # the dead member's batch first, after its lease
    assert sorted(handled[3:]) == [3, 4, 5]
    assert [n for n in handled if n % 2 == 0] == [0, 2, 4]
    assert [n for n in handled if n % 2 == 1] == [1, 3, 5]
