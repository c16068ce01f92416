"""Durable mode on a ``memory://`` bus: the journal, positions and groups in the process.

``Bus("memory://name", durable=True)`` registers :class:`MemoryDurablePlugin` as its
``durable`` plugin. It is the PostgreSQL :class:`~pgbus.durable.DurablePlugin` with its
storage replaced: the same hooks (journal on publish, delayed delivery, cancel, the
outcomes of durable deliveries, references to large events) and the same consumer loop
(:class:`~pgbus.durable._consumer.Consumer`: decode, route, hand over, wait for the
outcome, ack, persist a :class:`~pgbus.Nack`'s retry, dead-letter), over a
:class:`Journal` kept beside the ``memory://name`` broker. Every bus of that name in the
process shares it, so buses that subscribe with one durable name split its events (a
consumer group), and a subscription replays what was journaled while its bus was
stopped, from its position.

What the journal mirrors of the database's tables, and how:

* ``journal``: every event published, in order, with a journal id (1, 2, ...); kept as
  long as the broker lives (nothing is pruned);
* ``subscriptions``: a :class:`Group` per durable name, with its position (the last
  journal id it took in), channels and types;
* ``batches``: a group's events taken in and not yet handled, cut into
  batches (:class:`Batch`) of ``batch_size`` that a member claims (with a lease), acks, or
  hands back; a nacked event waits in a batch of its own until its retry is due; a key-
  ordered group takes its batches one after another;
* ``scheduled``: events published with ``delay=`` or ``at=``, moved into the journal
  by a timer when due.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
import weakref
from typing import TYPE_CHECKING, Any

from pgbus._markers import hookimpl
from pgbus._memory import Broker, broker, is_memory, no_database
from pgbus.durable._consumer import Consumer
from pgbus.durable._plugin import DurablePlugin
from pgbus.durable._schema import NOTIFY_LIMIT, SCHEMA_VERSION
from pgbus.durable._subscriptions import DurableSubscription, position_args
from pgbus.errors import ConfigError, DecodeError, DuplicateEventId

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import asyncpg

    from pgbus._bus import Bus
    from pgbus._drivers import AsyncConnection
    from pgbus._events import Message
    from pgbus._subscription import Subscription
    from pgbus.types import Outgoing

_journals: weakref.WeakKeyDictionary[Broker, Journal] = weakref.WeakKeyDictionary()


def journal_of(found: Broker) -> Journal:
    """The journal of ``found``, shared by every durable bus of its name."""
    journal = _journals.get(found)
    if journal is None:
        journal = _journals[found] = Journal(found)
    return journal


@dataclasses.dataclass(slots=True)
class Row:
    """One journaled event."""

    journal_id: int
    channel: str
    event_id: str
    type: str
    payload: str
    pid: int
    stored_at: float


@dataclasses.dataclass(slots=True, eq=False)
class Batch:
    """Events of a group, claimed and acked together (a row of ``batches``)."""

    seq: int
    journal_ids: list[int]
    not_before: float | None = None  # loop time: a retry waits until then
    attempt: int = 1
    deliveries: int = 0
    claimed_by: str | None = None
    claimed_until: float = 0.0

    def free_for(self, member: str, now: float) -> bool:
        """Whether ``member`` may claim it (unclaimed, its own, or its lease ran out)."""
        return self.claimed_by in (None, member) or self.claimed_until < now

    def due(self, now: float) -> bool:
        """Whether it may be handled now (a retry only once its delay passed)."""
        return self.not_before is None or self.not_before <= now


@dataclasses.dataclass(slots=True, eq=False)
class Group:
    """A durable subscription (consumer group) in the journal."""

    name: str
    channels: tuple[str, ...]
    types: tuple[str, ...] | None
    created_at: dt.datetime
    position: int
    pumped_at: dt.datetime | None = None
    batches: list[Batch] = dataclasses.field(default_factory=list)
    members: set[MemoryConsumer] = dataclasses.field(default_factory=set)

    def wants(self, row: Row) -> bool:
        """Whether ``row`` is one of this group's events."""
        return row.channel in self.channels and (self.types is None or row.type in self.types)

    def wake(self) -> None:
        """Have every member look for work."""
        for member in self.members:
            member.wake()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class Journal:
    """The durable state of one ``memory://name`` broker (see the module's docstring)."""

    def __init__(self, owner: Broker) -> None:
        self._broker = weakref.ref(owner)
        self.rows: list[Row] = []
        self._by_event: dict[str, Row] = {}
        self.groups: dict[str, Group] = {}
        #: Events published for later, by id: when due, in what order, the event.
        self.scheduled: dict[str, tuple[float, int, Outgoing]] = {}
        self._order = 0
        self._timer: asyncio.TimerHandle | None = None
        self._seq = 0

    # -- publishing ----------------------------------------------------------------------

    def append(self, outgoing: Sequence[Outgoing]) -> None:
        """Journal events, then notify them (a reference for one too large for NOTIFY).

        :raises DuplicateEventId: when an id is journaled for another event (nothing is
            journaled); the same event again is skipped.
        """
        taken = [
            o.id
            for o in outgoing
            if (row := self._by_event.get(o.id)) is not None
            and (row.channel, row.type, row.payload) != (o.channel, _type(o), o.payload)
        ]
        if taken:
            raise DuplicateEventId(taken)
        owner = self._broker()
        pid = owner.pid if owner is not None else 0
        new: list[Row] = []
        for out in outgoing:
            if out.id in self._by_event:
                continue
            row = Row(
                len(self.rows) + 1, out.channel, out.id, _type(out), out.payload, pid, time.time()
            )
            self.rows.append(row)
            self._by_event[row.event_id] = row
            new.append(row)
        if not new:
            return
        for group in self.groups.values():
            if any(group.wants(row) for row in new):
                group.wake()
        if owner is not None:
            owner.notify([r.channel for r in new], [_wakeup(r) for r in new])

    def schedule(self, outgoing: Sequence[Outgoing], due: float) -> None:
        """Keep events until ``due`` (epoch seconds); an id kept or journaled is skipped."""
        for out in outgoing:
            if out.id not in self.scheduled and out.id not in self._by_event:
                self._order += 1
                self.scheduled[out.id] = (due, self._order, out)
        self._arm()

    def _arm(self) -> None:
        """Set the timer for the first kept event (one timer for the journal)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.scheduled:
            first = min(due for due, _, _ in self.scheduled.values())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, first - time.time()), self.release_due)

    def release_due(self) -> None:
        """Move the kept events that fell due into the journal, in due order (and notify)."""
        now = time.time()
        due = sorted(v for v in self.scheduled.values() if v[0] <= now)
        for _, _, out in due:
            del self.scheduled[out.id]
        if due:
            self.append([out for _, _, out in due])
        self._arm()

    def cancel(self, event_id: str) -> bool:
        """Cancel a kept event not yet due."""
        return self.scheduled.pop(event_id, None) is not None

    def pending(self) -> tuple[int, float | None]:
        """How many events wait for their time, and the seconds until the first is due."""
        if not self.scheduled:
            return 0, None
        return len(self.scheduled), min(d for d, _, _ in self.scheduled.values()) - time.time()

    def row(self, journal_id: int) -> Row | None:
        """The journal row ``journal_id``."""
        return self.rows[journal_id - 1] if 0 < journal_id <= len(self.rows) else None

    # -- durable subscriptions -----------------------------------------------------------

    def _position(self, to: object) -> int:
        """The journal id before the first event a position takes in."""
        mode, at = position_args(to)
        if mode == "latest":
            return len(self.rows)
        if mode == "earliest" or at is None:
            return 0
        cutoff = at.timestamp()
        return sum(1 for row in self.rows if row.stored_at < cutoff)

    def ensure(self, sub: Subscription, types: Sequence[str] | None) -> Group:
        """The group of ``sub``: created at its start position, else its channels updated."""
        name: str = sub.durable  # type: ignore[assignment]  # only durable subs get here
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(
                name, (), None, _now(), self._position(sub.start_position)
            )
        group.channels = tuple(sub.channels)
        group.types = None if types is None else tuple(types)
        return group

    def seek(self, name: str, to: str | dt.datetime) -> bool:
        """Move group ``name``: what it had taken in is dropped, and it takes in from there."""
        position = self._position(to)
        group = self.groups.get(name)
        if group is None:
            return False
        group.batches.clear()
        group.position = position
        group.wake()
        return True

    def drop(self, name: str) -> bool:
        """Delete group ``name`` with what it had not handled."""
        return self.groups.pop(name, None) is not None

    def subscriptions(self) -> list[DurableSubscription]:
        """The groups, by name, as :func:`pgbus.durable.list_subscriptions` shows them.

        The backlog counts the due batches' events and those journaled since the last
        pump (events published while no member runs), as in the database.
        """
        return [self._subscription(g) for g in sorted(self.groups.values(), key=lambda g: g.name)]

    def _subscription(self, group: Group) -> DurableSubscription:
        now = _loop_time()
        due = [b for b in group.batches if b.due(now)]
        unpumped = [r for r in self.rows[group.position :] if group.wants(r)]
        first = [self.row(b.journal_ids[0]) for b in due if b.journal_ids]
        stored = [r.stored_at for r in (*first, *unpumped[:1]) if r is not None]
        return DurableSubscription(
            name=group.name,
            channels=group.channels,
            types=group.types,
            created_at=group.created_at,
            pumped_at=group.pumped_at,
            backlog=sum(len(b.journal_ids) for b in due) + len(unpumped),
            retries=len(group.batches) - len(due),
            oldest=dt.datetime.fromtimestamp(min(stored), dt.UTC) if stored else None,
        )

    def retries_waiting(self, name: str) -> int:
        """The events of group ``name`` waiting for a retry not yet due (the delayed gauge)."""
        group = self.groups.get(name)
        if group is None:
            return 0
        now = _loop_time()
        return sum(len(b.journal_ids) for b in group.batches if not b.due(now))

    # -- a member's work -----------------------------------------------------------------

    def _pump(self, group: Group, batch_size: int) -> None:
        """Cut the group's events journaled since its position into batches."""
        new = [r.journal_id for r in self.rows[group.position :] if group.wants(r)]
        group.position = len(self.rows)
        if new:
            group.pumped_at = _now()
        for start in range(0, len(new), batch_size):
            self._seq += 1
            group.batches.append(Batch(self._seq, new[start : start + batch_size]))

    def claim(
        self, name: str, member: str, lease: float, batch_size: int, *, ordered: bool
    ) -> list[dict[str, Any]]:
        """Claim the group's next batch for ``member``, with its events (as the SQL claim).

        Unordered: the first due batch no other member holds. Ordered (key-ordered
        groups): the first due batch, only when no other member holds it. A batch
        delivered before is split: its first event alone, the rest a batch after it.
        """
        group = self.groups.get(name)
        if group is None:
            return []
        if self.scheduled:  # a timer of a loop that is gone cannot release them
            self.release_due()
        self._pump(group, batch_size)
        now = _loop_time()
        due = (b for b in group.batches if b.due(now))
        if ordered:
            batch = next(due, None)
            if batch is not None and not batch.free_for(member, now):
                return []
        else:
            batch = next((b for b in due if b.free_for(member, now)), None)
        if batch is None:
            return []
        if batch.deliveries > 0 and len(batch.journal_ids) > 1:
            rest = Batch(batch.seq, batch.journal_ids[1:])
            group.batches.insert(group.batches.index(batch) + 1, rest)
            batch.journal_ids = batch.journal_ids[:1]
        batch.claimed_by, batch.claimed_until = member, now + lease
        batch.deliveries += 1
        rows = []
        for journal_id in batch.journal_ids:
            row = self.row(journal_id)
            rows.append(
                {
                    "journal_id": journal_id,
                    "deliveries": batch.deliveries,
                    "attempt": batch.attempt,
                    "channel": row.channel if row else None,
                    "event_id": row.event_id if row else None,
                    "payload": row.payload if row else None,
                    "pid": row.pid if row else 0,
                    "stored_at": row.stored_at if row else None,
                }
            )
        return rows

    def _claimed(self, name: str, member: str, ids: Iterable[int]) -> list[Batch]:
        group = self.groups.get(name)
        wanted = set(ids)
        if group is None or not wanted:
            return []
        return [
            b
            for b in group.batches
            if b.claimed_by == member and wanted.intersection(b.journal_ids)
        ]

    def ack(
        self, name: str, member: str, done: Sequence[int], retries: Sequence[tuple[Any, ...]]
    ) -> None:
        """Take handled events out of ``member``'s batches; retries into batches of their own.

        A retry is ``(journal id, delay, next attempt[, together])``: the events with the
        same ``together`` (a batch handler's) are retried in one batch, the others alone.
        """
        gone = set(done) | {r[0] for r in retries}
        group = self.groups.get(name)
        if group is None:
            return
        for batch in self._claimed(name, member, gone):
            batch.journal_ids = [j for j in batch.journal_ids if j not in gone]
        group.batches = [b for b in group.batches if b.journal_ids]
        group.wake()  # a key-ordered group's next batch may be free now
        loop = asyncio.get_running_loop()
        together: dict[object, Batch] = {}
        for retry in retries:
            journal_id, delay, attempt = retry[0], float(retry[1]), int(retry[2])
            key = retry[3] if len(retry) > 3 else journal_id  # noqa: PLR2004 - the optional 4th
            again = together.get(key)
            if again is None:
                self._seq += 1
                again = together[key] = Batch(self._seq, [], loop.time() + delay, attempt)
                group.batches.append(again)
                loop.call_later(delay, group.wake)
            again.journal_ids.append(journal_id)

    def release(self, name: str, member: str, ids: Sequence[int]) -> None:
        """Hand ``member``'s claims on ``ids`` back to the group."""
        for batch in self._claimed(name, member, ids):
            batch.claimed_by, batch.claimed_until = None, 0.0
        group = self.groups.get(name)
        if group is not None:
            group.wake()

    def renew(self, name: str, member: str, lease: float, ids: Sequence[int]) -> None:
        """Extend ``member``'s lease on the batches holding ``ids``."""
        until = _loop_time() + lease
        for batch in self._claimed(name, member, ids):
            batch.claimed_until = until


def _on_memory(bus: Bus) -> bool:
    try:
        return is_memory(bus.dsn)
    except ConfigError:  # no DSN known yet: not a memory:// bus, which names one when built
        return False


def _type(out: Outgoing) -> str:
    return out.event.pgbus_type if out.event is not None else ""


def _wakeup(row: Row) -> str:
    """What is notified for a journaled event: itself, or a reference when too large."""
    size = len(row.payload.encode())
    if size < NOTIFY_LIMIT:
        return row.payload
    reference = {
        "v": 1,
        "id": row.event_id,
        "type": "pgbus.ref",
        "ts": time.time(),
        "data": {"journal_id": row.journal_id, "type": row.type, "bytes": size},
    }
    return json.dumps(reference, separators=(",", ":"))


class MemoryConsumer(Consumer):
    """The durable consumer, claiming from a :class:`Journal` instead of the tables."""

    def __init__(self, plugin: MemoryDurablePlugin, bus: Bus, sub: Subscription) -> None:
        super().__init__(plugin, bus, sub)
        self.journal = plugin.journal
        self._memory = plugin
        self._pipelined = False  # the journal answers at once: nothing to overlap

    async def _step(self) -> bool:
        """Ack what was handled, claim the next batch and handle it."""
        if self.sub not in self.bus.subscriptions:  # unsubscribed: this member leaves
            self._stopping = True
            return False
        await self._ack()
        self.sub.deferred = self.journal.retries_waiting(self.group)  # as next_due counts
        plugin = self._memory
        rows = self.journal.claim(
            self.group,
            self.member,
            plugin.lease,
            plugin.batch_size,
            ordered=self.sub.key is not None,
        )
        if not rows:
            return False
        await self._handle(rows)
        return True

    async def _ack(self, names: tuple[str, ...] | None = None) -> None:
        for name in self.names if names is None else names:
            acks, retries = list(self._acks[name]), list(self._retries[name])
            if acks or retries:
                self.journal.ack(self.group, name, acks, retries)
                del self._acks[name][: len(acks)]
                del self._retries[name][: len(retries)]

    async def _execute(self, query: str, *args: Any) -> None:
        """Run what the consumer would run in SQL: a release or a lease renewal."""
        sql = self._memory.sql
        if query is sql.release:
            self.journal.release(*args)
        elif query is sql.renew:
            self.journal.renew(*args)
        else:  # pragma: no cover - a statement this journal does not know yet
            msg = "the memory journal cannot run this durable statement"
            raise NotImplementedError(msg)

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        """Stop as the database consumer does, then leave the group."""
        try:
            await super().stop(timeout)
        finally:
            group = self.journal.groups.get(self.group)
            if group is not None:
                group.members.discard(self)


class MemoryDurablePlugin(DurablePlugin):
    """Durable mode without PostgreSQL: what ``Bus("memory://name", durable=True)`` registers.

    The same hooks and consumer as :class:`~pgbus.durable.DurablePlugin`, over a journal
    kept in the process beside the ``memory://name`` broker (shared by every bus of that
    name): durable subscriptions with ``start=`` positions, :meth:`~pgbus.Bus.seek`,
    :meth:`~pgbus.Bus.durable_subscriptions` and :meth:`~pgbus.Bus.drop_subscription`;
    consumer groups across the buses of the name; ``publish(delay=/at=)`` and
    :meth:`~pgbus.Bus.cancel`; persisted :class:`~pgbus.Nack` retries; dead letters;
    key-ordered groups; events of any size. Nothing outlives the process, and nothing is
    pruned while the broker lives. ``bus.migrate()`` has nothing to create and returns.

    Takes :class:`~pgbus.durable.DurablePlugin`'s options that apply in memory
    (``lease``, ``batch_size``, ``max_deliveries``, ``dedup_window``); ``poll_interval``
    only bounds how long an idle consumer sleeps (the journal wakes it).

    :raises ConfigError: on a bus that is not ``memory://``.

    .. versionadded:: 0.3.0
    """

    def __init__(
        self,
        *,
        lease: float = 30.0,
        batch_size: int = 100,
        max_deliveries: int = 10,
        dedup_window: int = 10_000,
        poll_interval: float = 60.0,
    ) -> None:
        super().__init__(
            lease=lease,
            batch_size=batch_size,
            max_deliveries=max_deliveries,
            dedup_window=dedup_window,
            poll_interval=poll_interval,
            prune_interval=None,
            retention=None,
            persist_dead_letters=False,
        )
        self._journal: Journal | None = None

    def __repr__(self) -> str:
        return f"<MemoryDurablePlugin consumers={len(self.consumers)}>"

    @property
    def journal(self) -> Journal:
        """The journal of this plugin's ``memory://`` broker.

        :raises ConfigError: before the plugin is registered with a bus.
        """
        if self._journal is None:
            raise ConfigError("the memory durable plugin is not registered with a Bus")
        return self._journal

    async def pool(self) -> asyncpg.Pool:
        """There is none: a ``memory://`` bus has no database."""
        raise no_database("durable mode keeps its journal in the process")

    publish_pool = pool

    async def migrate(self) -> tuple[int, int]:
        """Nothing to create: the journal is in memory (``bus.migrate()`` succeeds)."""
        return SCHEMA_VERSION, SCHEMA_VERSION

    async def subscriptions(self) -> list[DurableSubscription]:
        """The durable subscriptions of the journal (``bus.durable_subscriptions()``)."""
        return self.journal.subscriptions()

    async def seek(self, name: str, to: str | dt.datetime) -> bool:
        """Move durable subscription ``name`` (``bus.seek()``)."""
        return self.journal.seek(name, to)

    async def drop_subscription(self, name: str) -> bool:
        """Delete durable subscription ``name`` (``bus.drop_subscription()``)."""
        return self.journal.drop(name)

    async def scheduled(self) -> tuple[int, float | None]:
        """The events published for later and not yet due, and the seconds to the first."""
        return self.journal.pending()

    async def prune(self) -> int:
        """Nothing is pruned from the memory journal."""
        return 0

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Bind the plugin to its bus and to the journal of its broker."""
        if not _on_memory(bus):
            raise ConfigError(
                "MemoryDurablePlugin serves a memory:// bus; for PostgreSQL use"
                " Bus(dsn, durable=True) (pgbus.durable.DurablePlugin)"
            )
        super().pgbus_configure(bus)
        self._journal = journal_of(broker(bus.dsn))

    @hookimpl
    async def pgbus_on_start(self, bus: Bus) -> None:
        """Register the durable subscriptions in the journal and start their consumers."""
        if bus is not self._bus:
            return
        for sub in bus.subscriptions:
            if sub.durable is None:
                continue
            if sub.batch is not None:
                raise ConfigError(
                    f"subscription {sub.name!r}: durable batch handlers need PostgreSQL yet"
                    " (a memory:// bus takes durable subscriptions of one event a call)"
                )
            if sub.durable in self.consumers:
                raise ConfigError(
                    f"durable name {sub.durable!r} is used by two subscriptions of one bus;"
                    " a group has one member per bus"
                )
            consumer = MemoryConsumer(self, bus, sub)
            self.journal.ensure(sub, consumer.types).members.add(consumer)
            self.consumers[sub.durable] = consumer
        self._running = True
        for member in self.consumers.values():
            member.start()

    async def _publish(
        self, outgoing: Sequence[Outgoing], connection: AsyncConnection | None
    ) -> None:
        del connection  # the publisher refused connection= on a memory:// bus already
        self.journal.append(outgoing)

    async def _schedule(
        self, outgoing: Sequence[Outgoing], due: float, connection: AsyncConnection | None
    ) -> None:
        if connection is not None:
            raise no_database("connection= has no transaction to join; publish without it")
        self.journal.schedule(outgoing, due)

    async def _cancel(self, event_id: str) -> bool:
        return self.journal.cancel(event_id)

    async def _stored_event(self, message: Message, reference: Mapping[str, Any]) -> Message | None:
        journal_id = reference["data"].get("journal_id")
        row = self.journal.row(journal_id) if isinstance(journal_id, int) else None
        if row is None or row.event_id != reference["id"] or row.channel != message.channel:
            raise DecodeError(
                message.channel,
                message.payload,
                f"reference to journal row {journal_id}, which holds another event",
            )
        return dataclasses.replace(
            message,
            payload=row.payload,
            pid=row.pid,
            stored_at=row.stored_at,
            stored_id=row.event_id,
        )

    async def _insert_dead_letter(self, **_: Any) -> None:
        """Nothing to store: the bus's ``dead_letters`` plugin keeps them in memory."""
