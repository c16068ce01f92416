"""The ``durable`` plugin: journal on publish, durable subscriptions, dead letters, retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from pgbus._coalesce import Coalescer
from pgbus._drivers import DriverError, executor
from pgbus._events import Batch, Message
from pgbus._markers import hookimpl
from pgbus._memory import is_memory
from pgbus._util import keep_session, plural, redact_dsn
from pgbus.durable._consumer import AGAIN, DEAD, DRIVER_ERRORS, OK, Consumer, Inflight, Outcomes
from pgbus.durable._schema import (
    DEFAULT_SCHEMA,
    UNIQUE_VIOLATION,
    Sql,
    check_schema,
    journal_args,
    journal_statement,
    migrate,
    publish_error,
    wakeup_notifications,
)
from pgbus.durable._subscriptions import (
    DurableSubscription,
    drop_subscription,
    list_subscriptions,
    position_args,
    seek,
)
from pgbus.durable._wakeups import Wakeups, transaction_probe
from pgbus.errors import ConfigError, DecodeError, DuplicateEventId

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence

    from pgbus._bus import Bus
    from pgbus._drivers import AsyncConnection
    from pgbus._events import DeadLetter, Delivery
    from pgbus._publish import Connection
    from pgbus._subscription import Overflow, Subscription
    from pgbus.types import Outgoing

logger = logging.getLogger(__name__)

#: Seven days: journal rows older than this are pruned even if a subscription lags.
DEFAULT_RETENTION = 7 * 24 * 3600.0


class DurablePlugin:
    """Durable delivery: at-least-once, de-duplicated, replayed after any gap.

    Registered as ``"durable"`` by ``Bus(dsn, durable=True)``, or passed as
    ``Bus(plugins=[DurablePlugin(schema="pgbus")])``. One instance serves one bus.
    With it:

    * ``publish``/``publish_many`` (also with ``connection=``) write each event into the
      journal table, and nothing else in the writer's transaction: this process sends
      the NOTIFYs once the rows committed (for ``connection=``, once it sees the
      caller's transaction commit); an event of 8000 bytes or more is notified as a
      reference and read from the journal;
    * ``subscribe(..., durable="name")`` makes a durable subscription: its position is
      kept in the database and moves only once the handler succeeded or the event was
      dead-lettered, so what it missed (disconnected, restarted) is replayed in order;
      processes with the same durable name share the work (a consumer group);
    * dead letters are also stored in the ``dead_letters`` table;
    * handled journal rows are pruned in the background.

    The schema must exist: ``pgbus migrate`` or ``await bus.migrate()`` creates it.

    :param schema: the PostgreSQL schema of pgbus's tables.
    :param lease: seconds a member's claim on an event lasts (renewed while its handler
        runs); after that a dead member's events go to the other members.
    :param poll_interval: seconds between looks at the journal when nothing woke the
        consumer (a safety net: NOTIFY and reconnects wake it at once).
    :param batch_size: events in one batch (a member claims one batch at a time).
    :param pump_size: journal rows cut into a subscription's batches per statement.
    :param max_deliveries: claims of one event after which it is dead-lettered unhandled
        (a poison event that kills its process every time).
    :param retention: seconds after which journal rows are pruned even when a durable
        subscription has not handled them (``None``: never).
    :param prune_interval: seconds between pruning runs (``None``: no pruning here).
    :param prune_batch: rows deleted per pruning statement (each its own short transaction).
    :param persist_dead_letters: also store the bus's plain dead letters in the table.
    :param dedup_window: event ids a consumer remembers to skip redeliveries.
    :param pool_max_size: connections of the plugin's pool.
    :raises ConfigError: for an invalid value (:class:`~pgbus.InvalidIdentifier` for the
        schema name).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        schema: str = DEFAULT_SCHEMA,
        *,
        lease: float = 30.0,
        poll_interval: float = 5.0,
        batch_size: int = 100,
        pump_size: int = 1000,
        max_deliveries: int = 10,
        retention: float | None = DEFAULT_RETENTION,
        prune_interval: float | None = 60.0,
        prune_batch: int = 1000,
        persist_dead_letters: bool = True,
        dedup_window: int = 10_000,
        pool_max_size: int = 4,
    ) -> None:
        for name, value in (
            ("lease", lease),
            ("poll_interval", poll_interval),
            ("batch_size", batch_size),
            ("pump_size", pump_size),
            ("max_deliveries", max_deliveries),
            ("retention", retention),
            ("prune_interval", prune_interval),
            ("prune_batch", prune_batch),
            ("dedup_window", dedup_window),
            ("pool_max_size", pool_max_size),
        ):
            if value is not None and value <= 0:
                raise ConfigError(f"DurablePlugin: {name} must be positive, not {value!r}")
        self.__name__ = "durable"  # the name pluggy registers it under
        self.sql = Sql(schema)
        self.schema = schema
        self.lease = float(lease)
        self.poll_interval = float(poll_interval)
        self.busy_retry = 0.02
        self.batch_size = batch_size
        self.pump_size = pump_size
        self.max_deliveries = max_deliveries
        self.retention = retention
        self.prune_interval = prune_interval
        self.prune_batch = prune_batch
        self.persist_dead_letters = persist_dead_letters
        self.dedup_window = dedup_window
        self.pool_max_size = pool_max_size
        self.consumers: dict[str, Consumer] = {}
        self.pruned = 0
        self._bus: Bus | None = None
        self._pool: asyncpg.Pool | None = None
        self._publish_pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._inflight: dict[tuple[str, str], Inflight] = {}
        self._by_channel: dict[str, list[Consumer]] = {}
        #: The backends of the consumers' pool that sent wake-ups (see :meth:`sending_from`).
        self._own_pids: set[int] = set()
        self._pruner: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        #: Set when this process published for later: the scheduler looks again.
        self._schedule_changed = asyncio.Event()
        #: Events published for later that this plugin moved into the journal when due.
        self.released = 0
        self._running = False
        #: The wake-ups of this plugin's publishes, sent once their rows committed.
        self.wakeups = Wakeups(self)
        #: Gathers concurrent publishes through the pool into shared statements.
        self.coalescer: Coalescer[Outgoing] = Coalescer(self._insert_pooled, lanes=pool_max_size)

    def __repr__(self) -> str:
        return f"<DurablePlugin schema={self.schema!r} consumers={len(self.consumers)}>"

    # -- the connection pool -------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        """The consumers' pool (created on first use).

        Its sessions commit with ``synchronous_commit=off``: a crash of the server can
        lose only the last moments of consumer progress (a suffix of the WAL), which
        means redelivery, never loss, so waiting for each flush would buy nothing.

        :returns: the pool.
        :raises ConfigError: when the plugin is not registered with a bus.
        """
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await self._create_pool(asynchronous=True)
        return self._pool

    async def publish_pool(self) -> asyncpg.Pool:
        """The pool durable publishes go through (the server's commit settings).

        :returns: the pool.
        :raises ConfigError: when the plugin is not registered with a bus.
        """
        if self._publish_pool is None:
            async with self._pool_lock:
                if self._publish_pool is None:
                    self._publish_pool = await self._create_pool(asynchronous=False)
        return self._publish_pool

    async def _create_pool(self, *, asynchronous: bool) -> asyncpg.Pool:
        bus = self._bus
        if bus is None:
            raise ConfigError("the durable plugin is not registered with a Bus")
        kwargs = bus.connect_kwargs
        if asynchronous:
            settings = dict(kwargs.get("server_settings") or {})
            settings.setdefault("synchronous_commit", "off")
            kwargs["server_settings"] = settings
            # Consumer statements are bounded; one that hangs (a half-open connection)
            # fails, and the consumer retries after the backoff.
            kwargs.setdefault("command_timeout", max(60.0, 2 * self.lease))
        pool: asyncpg.Pool = await asyncpg.create_pool(
            bus.dsn,
            min_size=0,
            max_size=self.pool_max_size,
            timeout=bus.connect_timeout,
            reset=keep_session,
            **kwargs,
        )
        return pool

    async def _close_pool(self) -> None:
        for pool in (self._pool, self._publish_pool):
            if pool is not None:
                await pool.close()
        self._pool = self._publish_pool = None

    # -- schema --------------------------------------------------------------------------

    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema (what ``bus.migrate()`` runs).

        :returns: ``(version before, version after)``.
        """
        async with self._admin() as conn:
            return await migrate(conn, self.schema)

    # -- durable subscriptions in the database -------------------------------------------

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[Connection]:
        """A connection for a one-off statement: the pool's while running, else its own."""
        if self._running:
            pool = await self.pool()
            async with pool.acquire() as conn:
                yield conn
            return
        bus = self._bus
        if bus is None:
            raise ConfigError("the durable plugin is not registered with a Bus")
        conn = await asyncpg.connect(bus.dsn, timeout=bus.connect_timeout, **bus.connect_kwargs)
        try:
            yield conn
        finally:
            await conn.close()

    async def subscriptions(self) -> list[DurableSubscription]:
        """The durable subscriptions of this plugin's schema (``bus.durable_subscriptions()``)."""
        async with self._admin() as conn:
            return await list_subscriptions(conn, self.schema)

    async def seek(self, name: str, to: str | dt.datetime) -> bool:
        """Move durable subscription ``name`` (``bus.seek()``; see :func:`pgbus.durable.seek`)."""
        position_args(to)  # a bad position is refused before connecting
        async with self._admin() as conn:
            moved = await seek(conn, name, to, self.schema)
        consumer = self.consumers.get(name)
        if consumer is not None:
            consumer.wake()
        return moved

    async def drop_subscription(self, name: str) -> bool:
        """Delete durable subscription ``name`` (``bus.drop_subscription()``)."""
        async with self._admin() as conn:
            return await drop_subscription(conn, name, self.schema)

    # -- hooks: lifecycle ----------------------------------------------------------------

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Bind the plugin to its bus."""
        if self._bus is not None and self._bus is not bus:
            raise ConfigError("a DurablePlugin serves one Bus; create one per bus")
        self._bus = bus

    @hookimpl
    async def pgbus_migrate(self, bus: Bus) -> None:
        """Create or upgrade the durable schema."""
        if bus is self._bus:
            before, after = await self.migrate()
            logger.info("durable schema %s: version %d -> %d", self.schema, before, after)

    @hookimpl
    async def pgbus_on_start(self, bus: Bus) -> None:
        """Check the schema, register the durable subscriptions, start their consumers."""
        if bus is not self._bus:
            return
        if is_memory(bus.dsn):
            raise ConfigError(
                "DurablePlugin needs PostgreSQL; a memory:// bus takes"
                " Bus('memory://...', durable=True) (pgbus.durable.MemoryDurablePlugin)"
            )
        pool = await self.pool()
        async with pool.acquire() as conn:
            await check_schema(conn, self.schema)
            for sub in bus.subscriptions:
                await self._register(conn, sub)
        self._running = True
        for consumer in self.consumers.values():
            consumer.start()
        if self.prune_interval is not None:
            self._pruner = asyncio.create_task(self._prune_loop(), name="pgbus-durable-prune")
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="pgbus-durable-due")
        logger.info(
            "durable delivery on %s (schema %s): %s",
            redact_dsn(bus.dsn),
            self.schema,
            plural(len(self.consumers), "durable subscription"),
        )

    async def _register(self, conn: Connection, sub: Subscription) -> None:
        group = getattr(sub, "durable", None)
        if group is None:
            return
        if group in self.consumers:
            raise ConfigError(
                f"durable name {group!r} is used by two subscriptions of one bus; a group"
                " has one member per bus"
            )
        bus = self._bus
        if bus is None:  # pragma: no cover - configured before start
            return
        consumer = Consumer(self, bus, sub)
        mode, at = position_args(sub.start_position)
        await conn.execute(
            self.sql.ensure_subscription, group, list(sub.channels), consumer.types, mode, at
        )
        self.consumers[group] = consumer
        for channel in sub.channels:
            self._by_channel.setdefault(channel, []).append(consumer)

    @hookimpl
    async def pgbus_on_stop(self, bus: Bus) -> None:
        """Stop the consumers (their batches finish and are acked) and the pruning."""
        if bus is not self._bus:
            return
        await asyncio.gather(*(c.stop(bus.stop_timeout) for c in self.consumers.values()))
        for task in (self._pruner, self._scheduler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pruner = self._scheduler = None

    @hookimpl
    async def pgbus_on_stopped(self, bus: Bus) -> None:
        """Close the pools once the handlers (and their dead letters) are done."""
        if bus is not self._bus:
            return
        self._running = False
        await self.wakeups.close(bus.stop_timeout)
        for inflight in self._inflight.values():
            inflight.resolve(AGAIN)
        await self._close_pool()

    # -- hooks: wake-ups -----------------------------------------------------------------

    @hookimpl
    def pgbus_on_received(self, messages: Sequence[Message]) -> None:
        """Wake the consumers of the channels that got a NOTIFY (not this process's own)."""
        if self._by_channel:
            own = self._own_pids
            self._wake({m.channel for m in messages if m.pid not in own})

    def wake_local(
        self,
        channels: Sequence[str],
        conn: asyncpg.pool.PoolConnectionProxy[Any] | None = None,
    ) -> None:
        """Wake this process's consumers of ``channels`` (committed events on them).

        Called as soon as the events are known to have committed, before their wake-ups
        go out to the other processes; with ``conn``, also :meth:`sending_from` it.
        """
        if conn is not None:
            self.sending_from(conn)
        if channels and self._by_channel:
            self._wake(set(channels))

    def sending_from(self, conn: asyncpg.pool.PoolConnectionProxy[Any]) -> None:
        """Wake-ups go out on ``conn`` (of the consumers' pool): its NOTIFYs wake nobody here.

        This process's consumers were woken already (:meth:`wake_local`), so the
        notifications coming back from that backend are ignored. Its pid is forgotten
        when the connection closes (a pid another backend may get later).
        """
        pid = conn.get_server_pid()
        own = self._own_pids
        if pid not in own:
            own.add(pid)
            conn.add_termination_listener(lambda _conn: own.discard(pid))

    def _wake(self, channels: set[str]) -> None:
        by_channel = self._by_channel
        for channel in channels:
            for consumer in by_channel.get(channel, ()):
                consumer.wake()

    @hookimpl
    def pgbus_on_connect(self, bus: Bus, channels: Sequence[str]) -> None:  # noqa: ARG002 - hook signature
        """Catch up once LISTEN is in place (the first connect and every reconnect)."""
        if bus is self._bus:
            for consumer in self.consumers.values():
                consumer.wake()

    @hookimpl
    def pgbus_on_resync(
        self,
        bus: Bus,
        channels: Sequence[str],  # noqa: ARG002 - hook signature
        disconnected_at: float,  # noqa: ARG002 - hook signature
        reconnected_at: float,  # noqa: ARG002 - hook signature
    ) -> None:
        """Replay what the gap missed: wake every consumer."""
        if bus is self._bus:
            for consumer in self.consumers.values():
                consumer.wake()

    # -- hooks: publishing ---------------------------------------------------------------

    @hookimpl
    def pgbus_publish(
        self, bus: Bus, outgoing: Sequence[Outgoing], connection: AsyncConnection | None
    ) -> Awaitable[None] | None:
        """Journal in one statement (the caller's transaction, if given); notify after."""
        if bus is not self._bus or not all(o.event is not None for o in outgoing):
            return None
        return self._publish(outgoing, connection)

    async def _publish(
        self, outgoing: Sequence[Outgoing], connection: AsyncConnection | None
    ) -> None:
        if connection is None:  # concurrent publishes through the pool share statements
            await self.coalescer.submit(outgoing)
        else:
            await self._insert(outgoing, connection)

    async def _insert_pooled(self, outgoing: Sequence[Outgoing]) -> None:
        await self._insert(outgoing, None)

    async def _insert(
        self, outgoing: Sequence[Outgoing], connection: AsyncConnection | None
    ) -> None:
        query, args = journal_statement(self.sql, outgoing)
        try:
            if connection is None:
                pool = await self.publish_pool()
                try:
                    record = await pool.fetchrow(query, *args)
                except asyncpg.UniqueViolationError:  # an id journaled already (a retry)
                    record = await pool.fetchrow(self.sql.publish, *journal_args(outgoing))
                row = None if record is None else tuple(record)
                committed = True
            else:  # the caller's transaction, whatever its driver
                run = executor(connection)
                in_transaction = transaction_probe(connection)
                try:
                    rows = await run.fetch(query, *args)
                except DriverError as exc:
                    if exc.sqlstate != UNIQUE_VIOLATION:
                        raise
                    if in_transaction is not None and in_transaction():  # aborted by it
                        raise DuplicateEventId(await self._journaled(outgoing)) from exc
                    rows = await run.fetch(self.sql.publish, *journal_args(outgoing))
                row = rows[0] if rows else None
                # a connection outside a transaction has committed already; another's
                # commit is watched for (its driver's status, then pg_xact_status)
                committed = in_transaction is not None and not in_transaction()
        except (DriverError, *DRIVER_ERRORS) as exc:
            raise publish_error(exc, self.schema) from exc
        if row is None or not row[0]:  # every event was journaled already
            return
        channels, payloads = wakeup_notifications(outgoing, row[0], row[1])
        if committed:
            self.wakeups.add(None, channels, payloads)
        else:
            self.wakeups.add(row[2], channels, payloads, in_transaction, connection, ids=row[0])

    async def _journaled(self, outgoing: Sequence[Outgoing]) -> list[str]:
        """The ids of ``outgoing`` the journal holds (all of them if it cannot tell)."""
        ids = [o.id for o in outgoing]
        pool = await self.pool()
        taken = [row[0] for row in await pool.fetch(self.sql.journaled, ids)]
        return taken or ids

    @hookimpl
    def pgbus_schedule(
        self,
        bus: Bus,
        outgoing: Sequence[Outgoing],
        due: float,
        connection: AsyncConnection | None,
    ) -> Awaitable[None] | None:
        """Keep events published for later until ``due`` (the caller's transaction, if given)."""
        if bus is not self._bus or not all(o.event is not None for o in outgoing):
            return None
        return self._schedule(outgoing, due, connection)

    async def _schedule(
        self, outgoing: Sequence[Outgoing], due: float, connection: AsyncConnection | None
    ) -> None:
        args = (*journal_args(outgoing), due)
        try:
            if connection is None:
                pool = await self.publish_pool()
                await pool.execute(self.sql.schedule, *args)
            else:
                await executor(connection).execute(self.sql.schedule, *args)
        except (DriverError, *DRIVER_ERRORS) as exc:
            raise publish_error(exc, self.schema) from exc
        self._schedule_changed.set()

    @hookimpl
    def pgbus_cancel(self, bus: Bus, event_id: str) -> Awaitable[bool] | None:
        """Cancel an event published for later, if it is not yet due."""
        if bus is not self._bus:
            return None
        return self._cancel(event_id)

    async def _cancel(self, event_id: str) -> bool:
        pool = await self.publish_pool()
        status = await pool.execute(self.sql.cancel, event_id)
        return bool(status.endswith(" 1"))

    async def scheduled(self) -> tuple[int, float | None]:
        """The events published for later and not yet due (the delayed backlog).

        :returns: how many wait, and the seconds until the first is due (``None``: none).
        """
        pool = await self.pool()
        row = await pool.fetchrow(self.sql.scheduled)
        return (0, None) if row is None else (int(row[1]), row[0])

    async def release_due(self) -> int:
        """Move the events published for later that fell due into the journal, and wake.

        Run by a background task of every started durable bus (one process at a time
        takes each event); the subscriptions that exist then get them.

        :returns: how many moved.
        """
        pool = await self.pool()
        async with pool.acquire() as conn:
            rows = await conn.fetch(self.sql.release_due, self.pump_size)
        if rows:
            self.wakeups.add(None, [r["channel"] for r in rows], [r["wakeup"] for r in rows])
            self.released += len(rows)
        return len(rows)

    def _report_scheduled(self, count: int) -> None:
        """Give the metrics plugin (if any) the count of events not yet due."""
        metrics = self._bus.plugins.get("metrics") if self._bus is not None else None
        gauge = getattr(metrics, "gauge", None)
        if callable(gauge):
            gauge("scheduled", count)

    async def _schedule_loop(self) -> None:
        """Release what falls due, waking at the next due time (or a local publish)."""
        while True:
            self._schedule_changed.clear()
            wait = self.poll_interval
            try:
                moved = await self.release_due()
                count, due = await self.scheduled()
                self._report_scheduled(count)
                if moved >= self.pump_size:  # more fell due than one statement moves
                    wait = 0.0
                elif count and due is not None:  # due already: another process has it
                    wait = min(wait, max(due, self.busy_retry))
            except DRIVER_ERRORS as exc:
                logger.warning("durable schema %s: releasing due events: %s", self.schema, exc)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._schedule_changed.wait(), wait)

    @hookimpl
    def pgbus_resolve_reference(
        self,
        bus: Bus,
        message: Message,
        reference: Mapping[str, Any],
    ) -> Awaitable[Message | None] | None:
        """Read the event a reference notification points to from the journal."""
        if bus is not self._bus:
            return None
        return self._stored_event(message, reference)

    async def _stored_event(self, message: Message, reference: Mapping[str, Any]) -> Message | None:
        journal_id = reference["data"].get("journal_id")
        if not isinstance(journal_id, int) or isinstance(journal_id, bool):
            raise DecodeError(message.channel, message.payload, "reference without a journal_id")
        pool = await self.pool()
        try:
            async with pool.acquire() as conn:
                row = await conn.fetchrow(self.sql.stored_event, journal_id)
        except DRIVER_ERRORS as exc:
            raise DecodeError(
                message.channel, message.payload, f"cannot read journal row {journal_id}: {exc}"
            ) from exc
        if row is None:  # pruned meanwhile
            return None
        if row["event_id"] != reference["id"] or row["channel"] != message.channel:
            raise DecodeError(
                message.channel,
                message.payload,
                f"reference to journal row {journal_id}, which holds another event",
            )
        return Message(
            message.channel,
            row["payload"],
            row["pid"],
            message.received_at,
            row["stored_at"],
            row["event_id"],
        )

    # -- hooks: outcomes -----------------------------------------------------------------

    def track(
        self, group: str, event_id: str, journal_id: int, batch: Outcomes | None = None
    ) -> Inflight:
        """Start waiting for the outcome of ``event_id`` in ``group`` (counted in ``batch``)."""
        inflight = Inflight(journal_id, batch)
        self._inflight[group, event_id] = inflight
        return inflight

    def forget(self, group: str, event_id: str) -> None:
        """Stop waiting for the outcome of ``event_id`` in ``group``."""
        self._inflight.pop((group, event_id), None)

    def find(
        self, subscription: Subscription | str | None, event_id: str | None
    ) -> Inflight | None:
        """The delivery of ``event_id`` awaited in ``subscription`` (a name), if any."""
        if subscription is None or event_id is None or not self._inflight:
            return None
        name = subscription if isinstance(subscription, str) else subscription.durable
        if name is None:
            return None
        return self._inflight.get((name, event_id))

    def hand_back(self, subscription: str, event_id: str | None) -> bool:
        """Hand a delivery in progress back to the journal: neither acked nor an attempt.

        For a handler that cannot finish now (its bus stops while what it needs is away,
        as the relay's broker): whatever the handler does after this, the event stays in
        the journal and is delivered again, to another member of the group or to this
        one after a restart.

        :param subscription: the durable name.
        :param event_id: the delivery's event id (``Message.stored_id``).
        :returns: whether the event was in progress in that durable subscription.

        .. versionadded:: 0.3.0
        """
        inflight = self.find(subscription, event_id)
        if inflight is None:
            return False
        inflight.resolve(AGAIN)
        return True

    @hookimpl
    def pgbus_on_handled(
        self,
        subscription: Subscription,
        delivery: Delivery,
        duration: float,  # noqa: ARG002 - hook signature
    ) -> None:
        """A durable delivery (each event of a batch) succeeded: it will be acked."""
        self._resolve(subscription, delivery, OK)

    def _resolve(self, subscription: Subscription, delivery: Delivery, outcome: str) -> None:
        if not self._inflight:
            return
        for one in delivery.deliveries if isinstance(delivery, Batch) else (delivery,):
            inflight = self.find(subscription, one.id)
            if inflight is not None:
                inflight.resolve(outcome)

    @hookimpl
    def pgbus_on_dropped(
        self,
        subscription: Subscription,
        delivery: Delivery,
        policy: Overflow,  # noqa: ARG002 - hook signature
    ) -> None:
        """A durable delivery was dropped by an overflow policy: deliver it again later."""
        self._resolve(subscription, delivery, AGAIN)

    @hookimpl
    async def pgbus_on_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Store the dead letter; a durable one is then acked (or retried if storing failed)."""
        durable_name = None
        if dead_letter.subscription is not None and self._bus is not None:
            for sub in self._bus.subscriptions:
                if sub.name == dead_letter.subscription:
                    durable_name = getattr(sub, "durable", None)
                    break
        inflight = self.find(durable_name, dead_letter.id)
        if inflight is None and not (self.persist_dead_letters and self._running):
            return
        try:
            await self._insert_dead_letter(
                subscription=durable_name or dead_letter.subscription,
                channel=dead_letter.channel,
                event_id=dead_letter.id,
                journal_id=inflight.journal_id if inflight is not None else None,
                payload=dead_letter.payload,
                error=dead_letter.error,
                attempts=dead_letter.attempts,
            )
        except DRIVER_ERRORS as exc:
            logger.warning("cannot store a dead letter of %s: %s", dead_letter.channel, exc)
            if inflight is not None:
                inflight.resolve(AGAIN)
            return
        if inflight is not None:
            inflight.resolve(DEAD)

    async def _insert_dead_letter(
        self,
        *,
        subscription: str | None,
        channel: str,
        event_id: str | None,
        journal_id: int | None,
        payload: str,
        error: BaseException,
        attempts: int,
    ) -> None:
        pool = await self.pool()
        async with pool.acquire() as conn:
            await conn.execute(
                self.sql.dead_letter,
                subscription,
                channel,
                event_id,
                journal_id,
                payload,
                f"{type(error).__name__}: {error}",
                attempts,
            )

    # -- retention -----------------------------------------------------------------------

    async def prune(self) -> int:
        """Delete journal rows no durable subscription needs any more, in bounded batches.

        Rows every subscription has taken in and handled go first; rows older than
        ``retention`` go whatever the subscriptions. Each batch is its own short
        transaction with a lock timeout, and only one process prunes at a time.

        :returns: how many journal rows were deleted.
        """
        pool = await self.pool()
        total = 0
        async with pool.acquire() as conn:
            horizon = await conn.fetchval(self.sql.prune_horizon)
        for query, args in (
            (self.sql.prune_done, (self.prune_batch, horizon)),
            (self.sql.prune_old, (self.prune_batch, self.retention)),
        ):
            if args[-1] is None:
                continue
            while True:
                async with pool.acquire() as conn, conn.transaction():
                    if not await conn.fetchval(self.sql.prune_lock, self.schema):
                        return total
                    await conn.execute("SET LOCAL lock_timeout = '2s'")
                    if query is self.sql.prune_old:
                        n = int(await conn.fetchval(query, *args))
                    else:
                        status = await conn.execute(query, *args)
                        n = int(status.rsplit(" ", 1)[-1])
                total += n
                if n < self.prune_batch:
                    break
        self.pruned += total
        if total:
            logger.info("durable schema %s: pruned %d journal rows", self.schema, total)
        return total

    async def _prune_loop(self) -> None:
        interval = self.prune_interval or 60.0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.prune()
            except DRIVER_ERRORS as exc:
                logger.warning("durable schema %s: pruning failed: %s", self.schema, exc)
