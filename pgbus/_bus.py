"""The Bus: configuration, lifecycle, the registry of subscriptions, and the public API.

It composes the parts that do the work (asyncpg's ``Pool`` composes its holders the same
way): the plugin facade (:mod:`pgbus._plugins`), the :class:`~pgbus._dispatch.Dispatcher`
(the receive path), the :class:`~pgbus._listener.Listener` (the LISTEN connection, whose
host is the dispatcher) and the :class:`~pgbus._publish.Publisher`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from pgbus import changes as _changes
from pgbus._channels import check_channel
from pgbus._config import resolve_dsn
from pgbus._dispatch import Dispatcher
from pgbus._events import Event, Outgoing
from pgbus._listener import Listener
from pgbus._memory import MemoryListener, broker, is_memory, no_database
from pgbus._plugins import PluginManager
from pgbus._publish import Connection, Publisher, check_size
from pgbus._signals import stop_on_signals
from pgbus._status import BusState, BusStatus, ListenerState
from pgbus._subscription import DEFAULT_MAX_PENDING, Overflow, Subscription
from pgbus._util import plural, redact_dsn
from pgbus.errors import AlreadyStarted, BusClosed, ConfigError, due_time

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
    from types import TracebackType

    import asyncpg

    from pgbus._drivers import AsyncConnection
    from pgbus._events import DeadLetter
    from pgbus._status import ResyncCallback
    from pgbus._subscription import Handler, Retry, TimeoutAction

    # typed access to built-ins (bus.metrics, bus.dead_letters, request(), durable): type-only
    from pgbus.default_plugins.dead_letters import DeadLetters
    from pgbus.default_plugins.metrics import Metrics
    from pgbus.default_plugins.reply import Replies
    from pgbus.durable import DurablePlugin, DurableSubscription

logger = logging.getLogger(__name__)

#: What a durable-only feature raises on a bus without the durable plugin.
_NEEDS_DURABLE = "{what} needs durable mode: Bus(dsn, durable=True) (and `pgbus migrate`)"

H = TypeVar("H", bound="Handler")

__all__ = ["Bus", "BusState"]


class Bus:
    """An event bus on one PostgreSQL database: one LISTEN connection, one publish pool.

    Use it as an async context manager (``async with Bus(dsn) as bus:``) or call
    :meth:`start` and :meth:`stop`. Subscribe before starting with the
    :meth:`subscribe` decorator, or at any time with :meth:`listen`.

    :param dsn: a PostgreSQL URL or libpq keyword DSN (``"host=db dbname=app"``,
        ``"service=mysvc"``). Without it the bus finds its database when it starts:
        ``$PGBUS_DSN``, else libpq's ``PGHOST``/``PGPORT``/``PGUSER``/``PGDATABASE``/
        ``PGSERVICE`` (see :attr:`dsn`). ``"memory://name"`` builds an in-memory bus
        for tests, with no PostgreSQL: buses of one name in a process share a broker.
    :param plugins: plugin objects to register after the built-ins and entry points.
    :param load_entrypoints: load plugins of the ``pgbus`` entry-point group
        (``PGBUS_DISABLE_PLUGIN_AUTOLOAD=1`` also turns this off).
    :param disable_plugins: names of plugins not to register (``"metrics"``, …);
        ``PGBUS_DISABLE_PLUGINS`` adds to it.
    :param connect_timeout: seconds one connection attempt may take.
    :param start_timeout: seconds :meth:`start` keeps trying (with backoff) before it fails.
    :param stop_timeout: seconds :meth:`stop` waits for queued and running handlers.
    :param health_check_interval: seconds between health checks of the LISTEN connection.
    :param health_check_timeout: seconds a health check may take before the connection
        is considered dead (half-open) and replaced.
    :param pool_max_size: the publish pool's size.
    :param publish_retries: how many times a publish through the pool is retried on a
        fresh connection after its connection broke (delays from the backoff hook).
    :param publish_timeout: seconds a publish through the pool may take, retries
        included; then it fails with :class:`PublishError`.
    :param max_pending: default bound of each subscription's queue.
    :param retry: the :class:`~pgbus.Retry` policy of subscriptions that set none
        (default: the retry plugin's, 3 attempts).
    :param connect_kwargs: extra keyword arguments for :func:`asyncpg.connect` (both the
        listener and the pool), e.g. ``ssl``. The listener's connection is normally a
        subclass of asyncpg's that takes notifications straight from the protocol; with
        a ``connection_class`` of your own it gets them through asyncpg's listener
        callbacks instead (about 1 µs more per notification).
    :param durable: register the ``durable`` plugin (:class:`pgbus.durable.DurablePlugin`
        with its defaults) unless one is registered: published events are journaled, and
        ``subscribe(..., durable="name")`` works. On a ``memory://`` bus it is
        :class:`pgbus.durable.MemoryDurablePlugin`, whose journal lives in the process.
    :param allow_sql_ascii: start on a database whose encoding is ``SQL_ASCII``. By
        default the bus refuses: there a NOTIFY whose payload is not UTF-8 makes the
        server end the LISTEN session, and what is published until the reconnect is
        lost (the bus reports each such end as a decode failure).

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0 ``allow_sql_ascii``.
    .. versionchanged:: 0.3.0 ``durable=True`` on a ``memory://`` bus.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
        disable_plugins: Iterable[str] = (),
        connect_timeout: float = 5.0,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        health_check_interval: float = 10.0,
        health_check_timeout: float = 3.0,
        pool_max_size: int = 10,
        publish_retries: int = 3,
        publish_timeout: float = 10.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry: Retry | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        durable: bool = False,
        allow_sql_ascii: bool = False,
    ) -> None:
        if dsn is not None and not dsn.strip():
            raise ConfigError("the DSN is empty: pass None to look it up when the bus starts")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("start_timeout", start_timeout),
            ("stop_timeout", stop_timeout),
            ("health_check_interval", health_check_interval),
            ("health_check_timeout", health_check_timeout),
            ("publish_timeout", publish_timeout),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {value!r}")
        if publish_retries < 0:
            raise ConfigError(f"publish_retries must be 0 or more, not {publish_retries!r}")
        self._dsn_given, self._dsn = dsn, None if dsn is None else resolve_dsn(dsn)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_pending = max_pending
        self.retry = retry
        self.plugins = PluginManager(
            plugins, load_entrypoints=load_entrypoints, disable_plugins=disable_plugins
        )
        kwargs = dict(connect_kwargs or {})
        self._connect_kwargs, self._connect_timeout = kwargs, connect_timeout
        memory = broker(dsn) if dsn is not None and is_memory(dsn) else None
        if durable:  # a memory:// bus takes the durable plugin that keeps its journal in memory
            self.plugins.enable("durable", memory=memory is not None)
        self._dispatch = Dispatcher(self.plugins, self)
        self._listener: Listener | MemoryListener
        if memory is not None:
            self._listener = MemoryListener(memory, self._dispatch)
        else:
            self._listener = Listener(
                self._resolve_dsn,
                self._dispatch,
                connect_timeout=connect_timeout,
                health_check_interval=health_check_interval,
                health_check_timeout=health_check_timeout,
                connect_kwargs=kwargs,
                allow_sql_ascii=allow_sql_ascii,
            )
        self._dispatch.reader = self._listener
        self._publisher = Publisher(
            self._resolve_dsn,
            plugins=self.plugins,
            owner=self,
            connect_timeout=connect_timeout,
            pool_max_size=pool_max_size,
            connect_kwargs=kwargs,
            retries=publish_retries,
            timeout=publish_timeout,
            memory=memory,
        )
        self._state = BusState.NEW
        self._subscriptions: dict[str, Subscription] = {}
        self._closed: asyncio.Event | None = None
        self.plugins.hook.pgbus_configure.call_historic(kwargs={"bus": self})

    def __repr__(self) -> str:
        where = redact_dsn(self._dsn) if self._dsn is not None else "(DSN not resolved yet)"
        return f"<Bus {where} {self._state.value}>"

    @property
    def dsn(self) -> str:
        """The database, as a URL: resolved on first use (at the latest by :meth:`start`).

        From the ``dsn`` argument, else ``$PGBUS_DSN``, else libpq's environment and
        files (see :func:`pgbus.resolve_dsn`).

        :raises ConfigError: when none of them names a database.

        .. versionchanged:: 0.2.0
           Resolved lazily: ``Bus()`` can be built before the environment is set.
        """
        return self._resolve_dsn()

    @dsn.setter
    def dsn(self, dsn: str) -> None:
        """Name the database of a bus built without one (``pgbus run --dsn``), before start.

        :raises AlreadyStarted: once the bus started.
        """
        if self._state is not BusState.NEW:
            raise AlreadyStarted("the database of a started bus cannot change")
        self._dsn_given, self._dsn = dsn, resolve_dsn(dsn)

    def _resolve_dsn(self) -> str:
        if self._dsn is None:
            self._dsn = resolve_dsn(self._dsn_given)
        return self._dsn

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> BusState:
        """The bus's :class:`BusState`."""
        return self._state

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Every subscription, in the order they were made."""
        return tuple(self._subscriptions.values())

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this bus listens on."""
        return self._listener.channels

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up right now."""
        return self._listener.connected

    @property
    def listener_pid(self) -> int | None:
        """The PostgreSQL backend pid of the LISTEN connection, while connected."""
        return self._listener.backend_pid

    @property
    def reconnects(self) -> int:
        """How many times the LISTEN connection was re-established."""
        return self._listener.reconnects

    @property
    def status(self) -> BusStatus:
        """The LISTEN connection's state, since when, reconnects and last error.

        .. versionadded:: 0.1.0
        """
        listener = self._listener
        state, since = listener.state, listener.state_since
        if self._state is BusState.NEW:
            state = ListenerState.NOT_STARTED
        elif self._state is BusState.STOPPED and state is not ListenerState.FAILED:
            state = ListenerState.STOPPED
        return BusStatus(state, since, listener.reconnects, listener.last_error, self.channels)

    @property
    def ready(self) -> bool:
        """Whether the bus is running, listening and dispatching: a readiness check.

        False whenever the LISTEN connection is down or the dispatcher is not running.

        .. versionadded:: 0.1.0
        """
        return (
            self._state is BusState.RUNNING
            and self._listener.state is ListenerState.CONNECTED
            and self._dispatch.running
        )

    @property
    def duplicates(self) -> int:
        """Envelopes received again with an id seen recently, and dropped.

        .. versionadded:: 0.1.0
        """
        return self._dispatch.duplicates

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """The extra :func:`asyncpg.connect` arguments of this bus's connections (a copy).

        For plugins that open connections of their own.

        .. versionadded:: 0.2.0
        """
        return dict(self._connect_kwargs)

    @property
    def connect_timeout(self) -> float:
        """Seconds one connection attempt may take.

        .. versionadded:: 0.2.0
        """
        return self._connect_timeout

    async def pool(self) -> asyncpg.Pool:
        """The bus's publish pool (created on first use), for plugins that run SQL.

        Use it for short statements that leave no session state behind (settings,
        ``LISTEN``, prepared state, session advisory locks): its connections are handed
        back without a reset (see :func:`pgbus._util.keep_session`).

        .. versionadded:: 0.2.0
        """
        return await self._publisher.pool()

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The most recent dead letters, oldest first, kept by the ``dead_letters`` plugin.

        :raises ConfigError: when that plugin was disabled.

        .. versionadded:: 0.1.0
        """
        plugin = self.plugins.get("dead_letters")
        if plugin is None:
            raise ConfigError("the dead_letters plugin is disabled on this bus")
        return typing.cast("DeadLetters", plugin).list()

    @property
    def metrics(self) -> Metrics:
        """The built-in metrics plugin.

        :raises ConfigError: when it was disabled.
        """
        plugin = self.plugins.get("metrics")
        if plugin is None:
            raise ConfigError("the metrics plugin is disabled on this bus")
        return typing.cast("Metrics", plugin)

    def _check_open(self) -> None:
        if self._state in (BusState.STOPPING, BusState.STOPPED):
            raise BusClosed("this bus is stopped; create a new Bus")

    # -- subscribing ---------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        *targets: str | type[Event],
        name: str | None = None,
        concurrency: int = 1,
        max_pending: int | None = None,
        on_resync: ResyncCallback | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        on_timeout: TimeoutAction = "cancel",
        warn_after: float | None = None,
        where: Callable[[Any], bool] | None = None,
        overflow: Overflow | str = Overflow.WAIT,
        durable: str | None = None,
        start: str | dt.datetime | None = None,
        key: Callable[[Any], Hashable] | None = None,
        batch: int | None = None,
        batch_wait: float | None = None,
    ) -> Callable[[H], H]: ...
    @overload  # after the one above: an Event class is callable, and a handler too
    def subscribe(self, handler: H, /) -> H: ...
    def subscribe(
        self,
        *targets: Any,
        name: str | None = None,
        concurrency: int = 1,
        max_pending: int | None = None,
        on_resync: ResyncCallback | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        on_timeout: TimeoutAction = "cancel",
        warn_after: float | None = None,
        where: Callable[[Any], bool] | None = None,
        overflow: Overflow | str = Overflow.WAIT,
        durable: str | None = None,
        start: str | dt.datetime | None = None,
        key: Callable[[Any], Hashable] | None = None,
        batch: int | None = None,
        batch_wait: float | None = None,
    ) -> Any:
        """Decorate a handler to subscribe it, before the bus starts.

        ``@bus.subscribe(OrderPlaced)`` gives the handler ``OrderPlaced`` events (its
        channel comes from the model); several event types may be given. A channel name,
        ``@bus.subscribe("audit")``, gives it every raw :class:`~pgbus.Message` on that
        channel. Bare ``@bus.subscribe`` takes the event type from the handler's first
        parameter's annotation.

        :param targets: event types, or one channel name.
        :param name: the subscription's name (default: the handler's qualified name).
        :param concurrency: how many events it handles at once (1 keeps publish order).
        :param max_pending: bound of its queue (default: the bus's ``max_pending``).
        :param retry: its :class:`~pgbus.Retry` policy (default: the bus's ``retry``).
        :param timeout: seconds one handler attempt may run (default: no limit).
        :param on_timeout: ``"cancel"`` the attempt at its timeout (it fails with
            :class:`TimeoutError`), or only ``"report"`` it.
        :param warn_after: seconds after which a running attempt is reported as slow
            (default: the timeouts plugin's, 10 s).
        :param where: a predicate on the event (the message, for a channel
            subscription); only what it accepts is routed to this handler.
        :param overflow: what to do when its queue is full (:class:`~pgbus.Overflow`).
        :param on_resync: called with a :class:`~pgbus.Gap` after each reconnect, once
            LISTEN is re-issued, to catch up on what the gap lost (rebuild a cache).
            Deliveries to this subscription wait until it returns, so none is applied
            to the state it is rebuilding, and none that arrives meanwhile is lost.
        :param durable: make it a durable subscription of this name (needs the
            ``durable`` plugin: ``Bus(dsn, durable=True)``): it is fed from the journal,
            keeps its position in the database, replays what it missed, and shares the
            work with the other subscriptions of that name (a consumer group).
        :param start: where a durable subscription that does not exist yet in the
            database starts: ``"latest"`` (the default: what is published from now on),
            ``"earliest"`` (every event still in the journal) or an aware datetime (the
            events journaled from then on); an existing one keeps its position (move it
            with :meth:`seek`).
        :param key: a function of the event (the message, for a channel subscription)
            returning a hashable key: events with equal keys are handled one at a time,
            in publish order, events with different keys in parallel (up to
            ``concurrency``). An event whose key function raises is dead-lettered. With
            ``batch``: a batch runs once the earlier batches sharing one of its keys are
            done.
        :param batch: make it a batch handler: it gets a list of up to ``batch`` events
            (messages, for a channel subscription) at once, what is queued or arrives
            within ``batch_wait`` seconds (default 0.05); the batch is retried whole and
            dead-lettered event by event (durable: acknowledged and retried as one row).
        :param batch_wait: how long a batch waits to fill, in seconds.
        :raises AlreadyStarted: when the bus is already running (use :meth:`listen`).
        :raises InvalidChannel: for a bad channel name.
        :raises ConfigError: for anything else it cannot subscribe to.
        """
        options: dict[str, Any] = {
            "retry": retry,
            "timeout": timeout,
            "on_timeout": on_timeout,
            "warn_after": warn_after,
            "where": where,
            "overflow": overflow,
            "durable": durable,
            "start": start,
            "key": key,
            "batch": batch,
            "batch_wait": batch_wait,
        }
        if len(targets) == 1 and callable(targets[0]) and not _is_target(targets[0]):
            handler = targets[0]
            self._add(self._make(handler, (), name, concurrency, max_pending, **options))
            self._set_resync(handler, on_resync)
            return handler

        def decorate(handler: H) -> H:
            self._add(self._make(handler, targets, name, concurrency, max_pending, **options))
            self._set_resync(handler, on_resync)
            return handler

        return decorate

    async def listen(
        self,
        target: str | type[Event] | Sequence[type[Event]],
        handler: Handler,
        *,
        name: str | None = None,
        concurrency: int = 1,
        max_pending: int | None = None,
        on_resync: ResyncCallback | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the handler's, not listen()'s
        on_timeout: TimeoutAction = "cancel",
        warn_after: float | None = None,
        where: Callable[[Any], bool] | None = None,
        overflow: Overflow | str = Overflow.WAIT,
        durable: str | None = None,
        start: str | dt.datetime | None = None,
        key: Callable[[Any], Hashable] | None = None,
        batch: int | None = None,
        batch_wait: float | None = None,
    ) -> Subscription:
        """Subscribe ``handler`` to ``target``; while running, LISTEN before returning.

        Takes the same arguments as :meth:`subscribe`.

        :returns: the new :class:`Subscription`.
        """
        self._check_open()
        targets = tuple(target) if isinstance(target, list | tuple) else (target,)
        sub = self._make(
            handler,
            targets,
            name,
            concurrency,
            max_pending,
            retry=retry,
            timeout=timeout,
            on_timeout=on_timeout,
            warn_after=warn_after,
            where=where,
            overflow=overflow,
            durable=durable,
            start=start,
            key=key,
            batch=batch,
            batch_wait=batch_wait,
        )
        self._add(sub, running_ok=True)
        self._set_resync(sub, on_resync)
        if self._state is BusState.RUNNING:
            self._dispatch.start_subscription(sub)
            for channel in sub.channels:
                await self._listener.listen(channel)
        return sub

    async def unlisten(self, target: str | type[Event] | Subscription) -> None:
        """Remove subscriptions: all on a channel, those of an event type, or one.

        Channels left without subscriptions are UNLISTENed at once while running.
        Deliveries already queued for a removed subscription are still handled.

        :raises InvalidChannel: when ``target`` is neither a valid channel name, an event
            type nor a subscription.
        """
        self._check_open()
        if isinstance(target, Subscription):
            removed = [target] if self._subscriptions.get(target.name) is target else []
        elif isinstance(target, type) and issubclass(target, Event):
            removed = [s for s in self._subscriptions.values() if target in s.event_types]
        else:
            channel = check_channel(target)
            removed = [s for s in self._subscriptions.values() if channel in s.channels]
        channels_before = set(self._dispatch.channels)
        for sub in removed:
            del self._subscriptions[sub.name]
        self._rebuild_channels()
        for channel in channels_before - set(self._dispatch.channels):
            await self._listener.unlisten(channel)
        for sub in removed:
            if self._state is BusState.RUNNING:
                await sub.stop(self.stop_timeout)

    def _make(
        self,
        handler: Handler,
        targets: Sequence[Any],
        name: str | None,
        concurrency: int,
        max_pending: int | None,
        **options: Any,
    ) -> Subscription:
        if not callable(handler):
            raise ConfigError(f"handler must be callable, not {type(handler).__name__}")
        self._check_durable(options.get("durable"))
        if not targets:
            targets = (_annotated_event(handler),)
        channels: list[str] = []
        event_types: list[type[Event]] = []
        for target in targets:
            if isinstance(target, type) and issubclass(target, Event):
                if target.pgbus_channel is None:
                    raise ConfigError(
                        f"{target.__name__} has no channel: declare it as"
                        f" class {target.__name__}(pgbus.Event, channel='...')"
                    )
                channels.append(target.pgbus_channel)
                event_types.append(target)
            elif isinstance(target, str) or not isinstance(target, type):
                if len(targets) != 1:
                    raise ConfigError("subscribe to one channel name, or to event types")
                channels.append(check_channel(target))
            else:
                raise ConfigError(f"cannot subscribe to {target!r}: not a pgbus.Event subclass")
        self._check_twice(handler, name, channels, event_types)
        base = name or getattr(handler, "__qualname__", None) or repr(handler)
        unique, n = base, 1
        while unique in self._subscriptions:
            if name is not None:
                raise ConfigError(f"a subscription named {name!r} already exists")
            n += 1
            unique = f"{base}#{n}"
        return Subscription(
            name=unique,
            channels=channels,
            event_types=event_types,
            handler=handler,
            concurrency=concurrency,
            max_pending=max_pending if max_pending is not None else self.max_pending,
            **options,
        )

    def _check_twice(
        self,
        handler: Handler,
        name: str | None,
        channels: list[str],
        event_types: list[type[Event]],
    ) -> None:
        """Refuse the same handler on the same targets again: it would run twice per event.

        A subscription given a ``name`` of its own is taken as meant.
        """
        if name is not None:
            return
        wanted = (tuple(dict.fromkeys(channels)), tuple(event_types))
        for sub in self._subscriptions.values():
            if sub.handler is handler and (sub.channels, sub.event_types) == wanted:
                raise ConfigError(
                    f"{getattr(handler, '__qualname__', handler)!r} is already subscribed to"
                    f" that (as {sub.name!r}); pass name= to subscribe it twice on purpose"
                )

    def _check_durable(self, durable: object) -> None:
        if durable is None:
            return
        if not isinstance(durable, str) or not durable:
            raise ConfigError(f"durable= takes a non-empty name, not {durable!r}")
        if self.plugins.get("durable") is None:
            raise ConfigError(
                "durable subscriptions need the durable plugin: Bus(dsn, durable=True)"
            )
        if self._state is not BusState.NEW:
            raise AlreadyStarted("durable subscriptions are made before the bus starts")

    def _add(self, sub: Subscription, *, running_ok: bool = False) -> None:
        self._check_open()
        if self._state is not BusState.NEW and not running_ok:
            raise AlreadyStarted(
                "the bus is already running: use `await bus.listen(target, handler)` instead"
            )
        self._subscriptions[sub.name] = sub
        try:
            self._rebuild_channels()
        except BaseException:
            del self._subscriptions[sub.name]
            self._rebuild_channels()
            raise

    def _rebuild_channels(self) -> None:
        self._dispatch.set_subscriptions(self._subscriptions.values())
        if self._state is BusState.NEW:
            self._listener.set_channels(self._dispatch.channels)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, LISTEN on every subscribed channel and start the handlers.

        Returns once LISTEN is in place, so events published afterwards are received.
        While the database is unreachable it keeps trying (per the backoff hook) for up
        to ``start_timeout`` seconds.

        :raises AlreadyStarted: when the bus is starting or running.
        :raises BusClosed: when the bus was stopped (a bus is single-use).
        :raises ConfigError: when no database is named (see :attr:`dsn`).
        :raises ListenerError: when it could not connect in time, or not at all.
        """
        if self._state in (BusState.STARTING, BusState.RUNNING):
            raise AlreadyStarted(f"this bus is already {self._state.value}")
        self._check_open()
        dsn = self.dsn
        if is_memory(dsn) and not isinstance(self._listener, MemoryListener):
            raise no_database(
                "a memory:// bus is chosen when it is built: pass the DSN to Bus() itself,"
                " not through PGBUS_DSN or the dsn setter"
            )
        self._state = BusState.STARTING
        self._closed = asyncio.Event()
        self._dispatch.start()
        for sub in self._subscriptions.values():
            self._dispatch.start_subscription(sub)
        try:
            await self.plugins.on_start(self)
            await self._listener.start(self.start_timeout)
        except BaseException:
            await self._shutdown(0)
            raise
        self._state = BusState.RUNNING
        logger.info(
            "bus listening on %s at %s",
            plural(len(self._dispatch.channels), "channel"),
            redact_dsn(dsn),
        )

    def _set_resync(self, sub: Subscription | Handler, on_resync: ResyncCallback | None) -> None:
        if on_resync is None:
            return
        if not isinstance(sub, Subscription):  # the handler just subscribed: its newest
            sub = next(s for s in reversed(self._subscriptions.values()) if s.handler is sub)
        self._dispatch.set_resync(sub, on_resync)

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a drain deadline
        """Stop listening, let queued and running handlers finish, close every connection.

        Harmless to call twice. Deliveries still waiting after ``timeout`` seconds
        (default: the bus's ``stop_timeout``) are dropped with a warning in the log; a
        handler that does not end when cancelled is abandoned and logged, so ``stop()``
        returns by its deadline (plus a moment to close the connections).
        """
        if self._state in (BusState.STOPPING, BusState.STOPPED):
            if self._closed is not None:
                await self._closed.wait()
            return
        if self._state is BusState.NEW:
            self._state = BusState.STOPPED
            await self.plugins.on_stop(self)
            await self.plugins.on_stopped(self)
            await self._publisher.close()
            return
        await self._shutdown(self.stop_timeout if timeout is None else timeout)

    async def _shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        self._state = BusState.STOPPING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        await _bounded(self._listener.stop(), left(), "closing the LISTEN connection")
        await self._dispatch.stop_resyncs()
        await _bounded(self.plugins.on_stop(self), left(), "the plugins' pgbus_on_stop")
        await self._dispatch.drain(left())
        await asyncio.gather(*(sub.stop(left()) for sub in self._subscriptions.values()))
        await _bounded(self.plugins.on_stopped(self), left(), "the plugins' pgbus_on_stopped")
        await _bounded(self._publisher.close(), left(), "closing the publish pool")
        self._state = BusState.STOPPED
        if self._closed is not None:
            self._closed.set()
        logger.info("bus stopped")

    async def wait_closed(self) -> None:
        """Wait until the bus is stopped.

        :raises ListenerError: when it stopped because reconnecting gave up.
        """
        if self._state is BusState.NEW:
            raise BusClosed("the bus was not started")
        await self._listener.wait()
        error = self._listener.terminal_error
        if error is not None:
            await self.stop()
            raise error
        if self._closed is not None:
            await self._closed.wait()

    async def run_forever(self) -> None:
        """Start (unless running), then serve until cancelled or signalled; stop on the way out.

        In the main thread, SIGTERM and SIGINT stop it gracefully: it stops listening,
        lets queued and running handlers finish for up to ``stop_timeout`` seconds, logs
        what was left, and returns. A second signal stops it at once: what was still
        queued or running is logged as abandoned and it raises ``SystemExit(128 +
        signal)`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a killed process.

        :raises ListenerError: when reconnecting gave up.

        .. versionchanged:: 0.2.0
           Handles SIGTERM and SIGINT.
        """
        with stop_on_signals() as signals:
            try:
                if self._state is BusState.NEW:
                    await self.start()
                await _first(self.wait_closed(), signals.first.wait())
            except BaseException:
                await self.stop()
                raise
            if not signals.count:
                await self.stop()
                return
            logger.warning(
                "%s: stopping… (handlers get up to %g s to finish; a second signal stops at once)",
                signals.name,
                self.stop_timeout,
            )
            stopping = asyncio.ensure_future(self.stop())
            await _first(asyncio.shield(stopping), signals.second.wait())
            if stopping.done():
                stopping.result()
                return
            abandoned = sum(sub.pending + sub.running for sub in self.subscriptions)
            logger.error(
                "%s again: stopping at once; %s abandoned",
                signals.name,
                plural(abandoned, "queued or running delivery", "queued or running deliveries"),
            )
            stopping.cancel()
            await asyncio.wait([stopping], timeout=_CLEANUP_FLOOR)
            raise SystemExit(signals.exit_status)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def migrate(self) -> None:
        """Create or upgrade the database objects of this bus's plugins (durable mode's schema).

        Idempotent, and safe when several processes run it at once. Nothing else
        creates them: ``pgbus migrate`` runs the same from the command line.

        :raises ConfigError: when no plugin of this bus owns database objects.

        .. versionadded:: 0.1.0
        """
        if not self.plugins.has_impls("pgbus_migrate"):
            raise ConfigError(
                "no plugin of this bus has a schema to migrate"
                " (durable mode: Bus(dsn, durable=True))"
            )
        await self.plugins.migrate(self)

    # -- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        event: Event,
        *,
        connection: AsyncConnection | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> str:
        """Publish ``event`` on its channel.

        :param event: the event; its class names the channel.
        :param connection: your connection (e.g. inside your transaction) to publish on:
            asyncpg's, SQLAlchemy's ``AsyncConnection``/``AsyncSession`` (asyncpg or
            psycopg dialect) or psycopg's ``AsyncConnection``; the event is then delivered
            only if that transaction commits. pgbus never commits or rolls it back.
        :param headers: string headers carried in the envelope.
        :param delay: durable mode: deliver no earlier than this many seconds (or this
            ``timedelta``) from now, to the subscriptions that exist then.
        :param at: durable mode: deliver no earlier than this aware datetime.
        :returns: the event's id (what :meth:`cancel` takes).
        :raises PayloadTooLarge: when the encoded event is 8000 bytes or more (nothing is
            sent); in durable mode large events are journaled and sent by reference.
        :raises PublishError: when PostgreSQL could not be reached.
        :raises ConfigError: for a ``connection`` of none of those drivers; for ``delay``
            or ``at`` without durable mode, a negative ``delay``, a naive ``at``, or both.
        :raises BusClosed: after :meth:`stop`.

        .. versionchanged:: 0.3.0 ``delay`` and ``at``.
        """
        self._check_open()
        due = due_time(delay, at)
        outs = self._publisher.encode((event,), headers)
        await self._send(outs, connection, due)
        return outs[0].id

    async def publish_many(
        self,
        events: Iterable[Event],
        *,
        connection: AsyncConnection | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> list[str]:
        """Publish many events in one statement (one round trip, all or nothing).

        Events may be on different channels; each channel receives its events in order.
        ``delay`` and ``at`` apply to every event, as in :meth:`publish`.

        :returns: the events' ids, in order.
        :raises PayloadTooLarge: when any event is too large (nothing is sent).

        .. versionchanged:: 0.3.0 ``delay`` and ``at``.
        """
        self._check_open()
        due = due_time(delay, at)
        outs = self._publisher.encode(events, headers)
        if not outs:
            return []
        await self._send(outs, connection, due)
        return [o.id for o in outs]

    async def request(
        self,
        event: Event,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - the wait for the reply
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Publish ``event`` as a request and return the first handler's reply.

        A handler answers by returning a value (``None`` answers nothing); the value is
        decoded into the handler's return annotation when that is a pydantic model or
        :class:`~pgbus.Event` this process has imported, else it is the JSON value. The
        reply comes back over this bus's own LISTEN connection (a reply channel it
        LISTENs on from the first request). The first reply wins; later ones are ignored.
        Built by the ``reply`` plugin (:mod:`pgbus.default_plugins.reply`).

        :param event: the request; published like :meth:`publish` does.
        :param timeout: seconds to wait for a reply.
        :param headers: string headers carried in the envelope.
        :returns: the reply.
        :raises RequestTimeout: when no handler replied within ``timeout``.
        :raises RequestFailed: when the answering handler failed for good (its error as
            text), or its reply could not be sent or decoded.
        :raises ConfigError: for a bad ``timeout``, a bus that is not running, or when the
            reply plugin is disabled.

        .. versionadded:: 0.3.0
        """
        self._check_open()
        plugin = self.plugins.get("reply")
        if plugin is None:
            raise ConfigError("request() needs the reply plugin, which is disabled on this bus")
        return await typing.cast("Replies", plugin).request(event, timeout=timeout, headers=headers)

    async def _send(
        self, outs: Sequence[Outgoing], connection: AsyncConnection | None, due: float | None
    ) -> None:
        """Send encoded events now, or hand them to the plugin that keeps them for ``due``."""
        if due is None:
            await self._publisher.publish(outs, connection)
        else:
            later = self.plugins.schedule(self, outs, due, connection)
            if later is None:
                raise ConfigError(_NEEDS_DURABLE.format(what="delayed delivery (delay=, at=)"))
            await later
        self.plugins.on_published(outs)

    def _durable(self, what: str) -> DurablePlugin:
        plugin = self.plugins.get("durable")
        if plugin is None:
            raise ConfigError(_NEEDS_DURABLE.format(what=what))
        return typing.cast("DurablePlugin", plugin)

    async def durable_subscriptions(self) -> list[DurableSubscription]:
        """The durable subscriptions in the database (of every process), by name.

        :raises ConfigError: without durable mode.

        .. versionadded:: 0.3.0
        """
        return await self._durable("durable_subscriptions()").subscriptions()

    async def seek(self, name: str, *, to: str | dt.datetime) -> bool:
        """Move durable subscription ``name`` to ``"earliest"``, ``"latest"`` or a datetime.

        Seeking back replays the events still in the journal from there; what it had
        taken in and not handled (retries too) is dropped first. Its running consumers
        go on from there after their batch in hand.

        :param name: the durable name.
        :param to: ``"earliest"``, ``"latest"`` or an aware datetime.
        :returns: whether it exists (and was moved).
        :raises ConfigError: without durable mode, or for another ``to``.

        .. versionadded:: 0.3.0
        """
        return await self._durable("seek()").seek(name, to)

    async def drop_subscription(self, name: str) -> bool:
        """Delete durable subscription ``name``: its position and its unhandled events.

        Stop its consumers first; one that starts again later begins anew (``start=``).

        :returns: whether it existed.
        :raises ConfigError: without durable mode.

        .. versionadded:: 0.3.0
        """
        return await self._durable("drop_subscription()").drop_subscription(name)

    async def cancel(self, event_id: str) -> bool:
        """Cancel an event published with ``delay=`` or ``at=`` that is not yet due.

        :param event_id: the id :meth:`publish` returned.
        :returns: whether it was cancelled (``False``: unknown, due already, or cancelled).
        :raises ConfigError: without durable mode.

        .. versionadded:: 0.3.0
        """
        taken = self.plugins.cancel(self, event_id)
        if taken is None:
            raise ConfigError(_NEEDS_DURABLE.format(what="cancel()"))
        return await taken

    async def notify(
        self, channel: str, payload: str = "", *, connection: AsyncConnection | None = None
    ) -> None:
        """Send a plain ``NOTIFY channel, payload`` (no envelope), as any client would.

        :raises InvalidChannel: for a bad channel name.
        :raises PayloadTooLarge: when ``payload`` is 8000 bytes or more.
        """
        self._check_open()
        check_channel(channel)
        if not isinstance(payload, str):
            raise ConfigError(f"payload must be a str, not {type(payload).__name__}")
        check_size(channel, payload)
        await self._publisher.send((channel,), (payload,), connection)
        self.plugins.on_published((Outgoing(channel, None, "", time.time(), {}, payload),))

    # -- table change triggers (pgbus.changes) ------------------------------------------

    async def install_change_trigger(
        self,
        table: str,
        *,
        schema: str | None = None,
        channel: str | None = None,
        model: type[_changes.RowChanged[Any]] | None = None,
        event_type: str | None = None,
        columns: Iterable[str] | None = None,
        operations: Iterable[str] = _changes.ALL_OPERATIONS,
        key: Iterable[str] | None = None,
        name: str = _changes.DEFAULT_TRIGGER_NAME,
        durable: bool = False,
        connection: Connection | None = None,
    ) -> _changes.ChangeTrigger:
        """Install a trigger that publishes every committed row change of ``table``.

        See :func:`pgbus.changes.install_change_trigger` for the arguments; the DDL runs
        on ``connection`` (in its transaction) or on the bus's publish pool.
        ``durable=True`` writes every change into the journal of this bus's durable
        plugin too (its ``journal=``), for durable subscriptions.

        :raises ConfigError: with ``durable=True`` on a bus without the durable plugin.

        .. versionadded:: 0.1.0
        """
        self._check_open()
        journal = None
        if durable:
            journal = getattr(self.plugins.get("durable"), "schema", None)
            if not isinstance(journal, str):
                raise ConfigError(
                    "durable change triggers need the durable plugin: Bus(dsn, durable=True)"
                )
        return await _changes.install_change_trigger(
            self if connection is None else connection,
            table,
            schema=schema,
            channel=channel,
            model=model,
            event_type=event_type,
            columns=columns,
            operations=operations,
            key=key,
            name=name,
            journal=journal,
        )

    async def remove_change_trigger(
        self,
        table: str,
        *,
        schema: str | None = None,
        name: str = _changes.DEFAULT_TRIGGER_NAME,
        connection: Connection | None = None,
    ) -> bool:
        """Remove a change trigger (see :func:`pgbus.changes.remove_change_trigger`).

        :returns: whether there was one.

        .. versionadded:: 0.1.0
        """
        self._check_open()
        return await _changes.remove_change_trigger(
            self if connection is None else connection, table, schema=schema, name=name
        )

    async def list_change_triggers(
        self,
        *,
        table: str | None = None,
        schema: str | None = None,
        connection: Connection | None = None,
    ) -> list[_changes.ChangeTrigger]:
        """List change triggers (see :func:`pgbus.changes.list_change_triggers`).

        .. versionadded:: 0.1.0
        """
        self._check_open()
        return await _changes.list_change_triggers(
            self if connection is None else connection, table=table, schema=schema
        )


async def _first(*steps: typing.Awaitable[object]) -> None:
    """Wait until the first of ``steps`` ends (re-raising its error); cancel the others."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    for task in done:
        task.result()


async def _bounded(step: typing.Awaitable[None], timeout: float, what: str) -> None:  # noqa: ASYNC109 - a stop deadline
    """Await one step of ``stop()``, abandoned (and logged) at the stop's deadline.

    A step that must still release resources gets a moment even when the deadline has
    passed, so that connections are closed rather than leaked.
    """
    try:
        await asyncio.wait_for(step, max(timeout, _CLEANUP_FLOOR))
    except TimeoutError:
        logger.warning("stop(): %s did not finish by the deadline; abandoned", what)


#: Seconds each closing step of ``stop()`` gets at least, past the deadline.
_CLEANUP_FLOOR = 0.25


def _is_target(obj: object) -> bool:
    return isinstance(obj, str) or (isinstance(obj, type) and issubclass(obj, Event))


def _annotated_event(handler: Handler) -> type[Event]:
    """The event type named by the annotation of ``handler``'s first parameter."""
    try:
        hints = typing.get_type_hints(handler)
    except (NameError, TypeError) as exc:
        raise ConfigError(f"cannot read the annotations of {handler!r}: {exc}") from exc
    hints.pop("return", None)
    first = next(iter(hints.values()), None)
    if isinstance(first, type) and issubclass(first, Event):
        return first
    raise ConfigError(
        f"{getattr(handler, '__qualname__', handler)!r}: annotate its first parameter with a"
        " pgbus.Event subclass, or pass event types or a channel to subscribe()"
    )
