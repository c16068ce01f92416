"""The Bus: subscriptions, the listener, the publisher and the plugins of one process."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
import time
import typing
from collections import deque
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from pgbus import changes as _changes
from pgbus._channels import check_channel
from pgbus._events import NO_HEADERS, Delivery, Event, Message, Notification
from pgbus._listener import INBOUND_HIGH_WATER, Listener
from pgbus._plugins import PluginManager
from pgbus._publish import Connection, Publisher, check_size
from pgbus._status import BusStatus, Gap, ListenerState
from pgbus._subscription import DEFAULT_MAX_PENDING, Overflow, Subscription
from pgbus._util import await_all, new_event_id, redact_dsn
from pgbus.default_plugins.dead_letters import DeadLetter
from pgbus.errors import BusClosed, ConfigError
from pgbus.types import Outgoing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from types import TracebackType

    from pgbus._status import ResyncCallback
    from pgbus._subscription import TimeoutAction
    from pgbus.default_plugins.dead_letters import DeadLetters
    from pgbus.default_plugins.metrics import Metrics
    from pgbus.default_plugins.retry import Retry
    from pgbus.errors import ListenerError
    from pgbus.types import CallNext, Decoder, Encoder, Handler, Middleware, Router

logger = logging.getLogger(__name__)

H = TypeVar("H", bound="Handler")


#: Notifications dispatched per round. After a round the dispatcher lets the handlers
#: run, so decoded events are handled and freed while they are young: the garbage
#: collector then never has to promote and rescan thousands of live events. (With 100
#: buses in one process, rounds of 300 made collection a third of the receive cost;
#: rounds of 32 cost one event-loop turn per 32 events.)
DISPATCH_BATCH = 32
#: Below this many notifications waiting in the process a paused listener reads again
#: (it pauses at :data:`~pgbus._listener.INBOUND_HIGH_WATER`): memory stays bounded when
#: handlers fall behind.
INBOUND_LOW_WATER = 1_000
#: How many recent event ids the receive path remembers (at least; at most twice as many)
#: to drop duplicates: an event published again by a publish retry whose first try had
#: in fact committed.
RECENT_IDS = 10_000


class BusState(enum.Enum):
    """Where a :class:`Bus` is in its life. A bus is single-use.

    .. versionadded:: 0.1.0
    """

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Channel:
    """What the dispatcher needs for one channel, rebuilt when subscriptions change."""

    __slots__ = ("decode", "route", "subscriptions")

    def __init__(self, decode: Decoder, route: Router, subscriptions: list[Subscription]) -> None:
        self.decode = decode
        self.route = route
        self.subscriptions = subscriptions


class Bus:
    """An event bus on one PostgreSQL database: one LISTEN connection, one publish pool.

    Use it as an async context manager (``async with Bus(dsn) as bus:``) or call
    :meth:`start` and :meth:`stop`. Subscribe before starting with the
    :meth:`subscribe` decorator, or at any time with :meth:`listen`.

    :param dsn: a PostgreSQL URL or DSN; defaults to ``$PGBUS_DSN``.
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
        ``subscribe(..., durable="name")`` works.

    .. versionadded:: 0.1.0
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
    ) -> None:
        dsn = dsn if dsn is not None else os.environ.get("PGBUS_DSN")
        if not dsn:
            raise ConfigError("no database: pass a DSN to Bus() or set PGBUS_DSN")
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
        self.dsn = dsn
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_pending = max_pending
        self.retry = retry
        self.plugins = PluginManager(
            plugins, load_entrypoints=load_entrypoints, disable_plugins=disable_plugins
        )
        self._hook = self.plugins.hook
        kwargs = dict(connect_kwargs or {})
        self._connect_kwargs, self._connect_timeout = kwargs, connect_timeout
        if durable and self.plugins.get("durable") is None:
            from pgbus.durable import DurablePlugin  # noqa: PLC0415 - an optional plugin

            self.plugins.register(DurablePlugin(), name="durable")
        # plain tuples until dispatched: the garbage collector stops tracking a tuple of
        # strings and numbers, so a long backlog costs it nothing
        self._inbound: deque[Notification] = deque()
        self._listener = Listener(
            dsn,
            self,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_kwargs=kwargs,
        )
        self._publisher = Publisher(
            dsn,
            connect_timeout=connect_timeout,
            pool_max_size=pool_max_size,
            connect_kwargs=kwargs,
            backoff=self._backoff,
            retries=publish_retries,
            timeout=publish_timeout,
        )
        self._resync: dict[str, tuple[ResyncCallback, asyncio.Event]] = {}
        self._resync_tasks: dict[str, asyncio.Task[None]] = {}
        self._state = BusState.NEW
        self._subscriptions: dict[str, Subscription] = {}
        self._channels: dict[str, _Channel] = {}
        self._encoders: dict[type[Event], tuple[str, Encoder]] = {}
        self._backlogged = 0
        # two generations: when the newer is full it becomes the older, the older is freed
        self._recent_ids: set[str] = set()
        self._older_ids: set[str] = set()
        #: Envelopes received again with an id seen among the last RECENT_IDS, dropped.
        self.duplicates = 0
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._draining = False
        self._on_handled_wanted = False
        self._closed: asyncio.Event | None = None
        self._hook.pgbus_configure.call_historic(kwargs={"bus": self})

    def __repr__(self) -> str:
        return f"<Bus {redact_dsn(self.dsn)} {self._state.value}>"

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
            state = ListenerState.STARTING
        elif self._state is BusState.STOPPED and state is not ListenerState.FAILED:
            state = ListenerState.STOPPED
        return BusStatus(state, since, listener.reconnects, listener.last_error, self.channels)

    @property
    def ready(self) -> bool:
        """Whether the bus is running and listening: a readiness check for health endpoints.

        .. versionadded:: 0.1.0
        """
        return self._state is BusState.RUNNING and self._listener.state is ListenerState.CONNECTED

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
    def subscribe(self, handler: H, /) -> H: ...
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
    ) -> Callable[[H], H]: ...
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
        :raises BusClosed: when the bus is already running (use :meth:`listen`).
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
        )
        self._add(sub, running_ok=True)
        self._set_resync(sub, on_resync)
        if self._state is BusState.RUNNING:
            self._start_subscription(sub)
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
        channels_before = set(self._channels)
        for sub in removed:
            del self._subscriptions[sub.name]
            self._resync.pop(sub.name, None)
        self._rebuild_channels()
        for channel in channels_before - set(self._channels):
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
            raise BusClosed("durable subscriptions are made before the bus starts")

    def _add(self, sub: Subscription, *, running_ok: bool = False) -> None:
        self._check_open()
        if self._state is not BusState.NEW and not running_ok:
            raise BusClosed(
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
        by_channel: dict[str, list[Subscription]] = {}
        for sub in self._subscriptions.values():
            for channel in sub.channels:
                routed = by_channel.setdefault(channel, [])  # LISTEN even if all are durable
                if sub.durable is None:  # durable ones are fed from the journal instead
                    routed.append(sub)
        channels: dict[str, _Channel] = {}
        for channel, subs in by_channel.items():
            types = list(
                dict.fromkeys(t for s in subs for t in s.event_types if t.pgbus_channel == channel)
            )
            names: dict[str, type[Event]] = {}
            for t in types:
                other = names.setdefault(t.pgbus_type, t)
                if other is not t:
                    raise ConfigError(
                        f"{other.__qualname__} and {t.__qualname__} share channel {channel!r}"
                        f" and type name {t.pgbus_type!r}; give one an event_type="
                    )
            old = self._channels.get(channel)
            if old is not None and old.subscriptions == subs:
                channels[channel] = old
                continue
            decode = self._hook.pgbus_decoder(channel=channel, event_types=types)
            route = self._hook.pgbus_router(channel=channel, subscriptions=subs)
            if decode is None or route is None:
                raise ConfigError(
                    f"no plugin provides a {'decoder' if decode is None else 'router'}"
                    f" for channel {channel!r} (was the built-in one disabled?)"
                )
            channels[channel] = _Channel(decode, route, subs)
        self._channels = channels
        if self._state is BusState.NEW:
            self._listener.set_channels(channels)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, LISTEN on every subscribed channel and start the handlers.

        Returns once LISTEN is in place, so events published afterwards are received.
        While the database is unreachable it keeps trying (per the backoff hook) for up
        to ``start_timeout`` seconds.

        :raises BusClosed: when the bus was started before.
        :raises ListenerError: when it could not connect in time, or not at all.
        """
        if self._state is not BusState.NEW:
            raise BusClosed(f"a bus can be started once; this one is {self._state.value}")
        self._state = BusState.STARTING
        self._closed = asyncio.Event()
        self._on_handled_wanted = self.plugins.has_impls("pgbus_on_handled")
        for sub in self._subscriptions.values():
            self._start_subscription(sub)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="pgbus-dispatcher")
        try:
            await await_all(self._hook.pgbus_on_start(bus=self))
            await self._listener.start(self.start_timeout)
        except BaseException:
            await self._shutdown(0)
            raise
        self._state = BusState.RUNNING
        logger.info("bus listening on %d channels at %s", len(self._channels), redact_dsn(self.dsn))

    def _set_resync(self, sub: Subscription | Handler, on_resync: ResyncCallback | None) -> None:
        if on_resync is None:
            return
        if not isinstance(sub, Subscription):  # the handler just subscribed: its newest
            sub = next(s for s in reversed(self._subscriptions.values()) if s.handler is sub)
        self._resync[sub.name] = (on_resync, asyncio.Event())
        self._resync[sub.name][1].set()

    def _start_subscription(self, sub: Subscription) -> None:
        middleware = [
            mw for mw in self._hook.pgbus_handler_middleware(subscription=sub) if mw is not None
        ]
        if sub.name in self._resync:  # outermost: hold deliveries while on_resync runs
            middleware.insert(0, _resync_gate(self._resync[sub.name][1]))
        sub.start(
            middleware,
            self._handled if self._on_handled_wanted else None,
            self._failed,
            self._dropped,
            self._backlog_changed,
        )

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a drain deadline
        """Stop listening, let queued and running handlers finish, close every connection.

        Harmless to call twice. Deliveries still waiting after ``timeout`` seconds
        (default: the bus's ``stop_timeout``) are dropped with a warning in the log.
        """
        if self._state in (BusState.STOPPING, BusState.STOPPED):
            if self._closed is not None:
                await self._closed.wait()
            return
        if self._state is BusState.NEW:
            self._state = BusState.STOPPED
            await self._safe_hook("pgbus_on_stop", bus=self)
            await self._safe_hook("pgbus_on_stopped", bus=self)
            await self._publisher.close()
            return
        await self._shutdown(self.stop_timeout if timeout is None else timeout)

    async def _shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        self._state = BusState.STOPPING
        await self._listener.stop()
        for task in self._resync_tasks.values():
            task.cancel()
        await asyncio.gather(*self._resync_tasks.values(), return_exceptions=True)
        await self._safe_hook("pgbus_on_stop", bus=self)
        deadline = time.monotonic() + timeout
        if self._dispatcher is not None:
            self._draining = True
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._dispatcher), timeout)
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for sub in self._subscriptions.values():
            await sub.stop(max(0.0, deadline - time.monotonic()))
        await self._safe_hook("pgbus_on_stopped", bus=self)
        await self._publisher.close()
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
        """Start (unless running), then serve until cancelled; stop on the way out.

        :raises ListenerError: when reconnecting gave up.
        """
        if self._state is BusState.NEW:
            await self.start()
        try:
            await self.wait_closed()
        finally:
            await self.stop()

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
        await await_all(self._hook.pgbus_migrate(bus=self))

    # -- publishing ----------------------------------------------------------------------

    def _encoder(self, event: Event) -> tuple[str, Encoder]:
        """The channel and the encoder of ``event``'s class, found once per class."""
        cls = type(event)
        found = self._encoders.get(cls)
        if found is not None:
            return found
        if not isinstance(event, Event):
            raise ConfigError(
                f"publish takes a pgbus.Event, not {cls.__name__}; "
                "use bus.notify(channel, text) for raw payloads"
            )
        channel = cls.pgbus_channel
        if channel is None:
            raise ConfigError(f"{cls.__name__} has no channel (class keyword channel=...)")
        encode = self._hook.pgbus_encoder(event_type=cls)
        if encode is None:
            raise ConfigError(f"no plugin provides an encoder for {cls.__name__}")
        found = self._encoders[cls] = (channel, encode)
        return found

    def _outgoing(
        self, events: Iterable[Event], headers: Mapping[str, str] | None
    ) -> list[Outgoing]:
        """Give each event an id and the publish time, and encode it."""
        ts = time.time()
        headers = headers or NO_HEADERS
        encoder = self._encoder
        outs = []
        for event in events:
            channel, encode = encoder(event)
            out = Outgoing(channel, event, new_event_id(), ts, headers)
            out.payload = encode(out)
            outs.append(out)
        return outs

    async def _send(self, outs: Sequence[Outgoing], connection: Connection | None) -> None:
        """Send encoded events: through a plugin that takes over (durable), else NOTIFY."""
        taken = self._hook.pgbus_publish(bus=self, outgoing=outs, connection=connection)
        if taken is not None:
            await taken
            return
        for out in outs:
            check_size(out.channel, out.payload)
        await self._publisher.send([o.channel for o in outs], [o.payload for o in outs], connection)

    async def publish(
        self,
        event: Event,
        *,
        connection: Connection | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Publish ``event`` on its channel.

        :param event: the event; its class names the channel.
        :param connection: an asyncpg connection (e.g. inside your transaction) to
            NOTIFY on; the event is then delivered only if that transaction commits.
        :param headers: string headers carried in the envelope.
        :returns: the event's id.
        :raises PayloadTooLarge: when the encoded event is 8000 bytes or more (nothing is
            sent); in durable mode large events are journaled and sent by reference.
        :raises PublishError: when PostgreSQL could not be reached.
        :raises BusClosed: after :meth:`stop`.
        """
        self._check_open()
        outs = self._outgoing((event,), headers)
        await self._send(outs, connection)
        self._hook.pgbus_on_published(outgoing=outs)
        return outs[0].id

    async def publish_many(
        self,
        events: Iterable[Event],
        *,
        connection: Connection | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Publish many events in one statement (one round trip, all or nothing).

        Events may be on different channels; each channel receives its events in order.

        :returns: the events' ids, in order.
        :raises PayloadTooLarge: when any event is too large (nothing is sent).
        """
        self._check_open()
        outs = self._outgoing(events, headers)
        if not outs:
            return []
        await self._send(outs, connection)
        self._hook.pgbus_on_published(outgoing=outs)
        return [o.id for o in outs]

    async def notify(
        self, channel: str, payload: str = "", *, connection: Connection | None = None
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
        self._hook.pgbus_on_published(
            outgoing=(Outgoing(channel, None, "", time.time(), {}, payload),)
        )

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

    async def _change_pool(self) -> Any:
        """The publish pool (opened on first use), on which :mod:`pgbus.changes` runs SQL."""
        return await self._publisher._get_pool()  # noqa: SLF001 - the bus's own publisher

    # -- the receive path ----------------------------------------------------------------

    def _inbound_ready(self) -> None:
        """The listener put a notification into the empty inbound queue."""
        self._wakeup.set()

    async def _dispatch(self) -> None:
        inbound = self._inbound
        wakeup = self._wakeup
        on_received = self._hook.pgbus_on_received
        deliver = self._deliver
        while True:
            if not inbound:
                if self._draining:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            batch = [Message(*inbound.popleft()) for _ in range(min(len(inbound), DISPATCH_BATCH))]
            on_received(messages=batch)
            for message in batch:
                error = deliver(message)
                if error is not None:
                    await self._undecodable(message, error)
            self._check_pressure()
            if inbound:
                await asyncio.sleep(0)  # the handlers' turn

    def _backlog_changed(self, delta: int) -> None:
        """A subscription's backlog (deliveries behind its full queue) grew or shrank."""
        self._backlogged += delta
        self._check_pressure()

    def _check_pressure(self) -> None:
        """Pause or resume reading the LISTEN socket by what waits in this process."""
        waiting = len(self._inbound) + self._backlogged
        if self._listener.paused:
            if waiting <= INBOUND_LOW_WATER:
                self._listener.resume_reading()
        elif waiting >= INBOUND_HIGH_WATER:
            self._listener.pause_reading()

    def _deliver(self, message: Message) -> Exception | None:
        """Decode, drop a duplicate, route: no await, for every notification.

        :returns: the decoder's error (the raw message is routed to untyped
            subscriptions all the same), for the dispatcher to report.
        """
        channel = self._channels.get(message.channel)
        if channel is None:  # UNLISTENed meanwhile
            return None
        error = None
        try:
            delivery = channel.decode(message)
        except Exception as exc:
            error = exc
            delivery = Delivery(message)
        event_id = delivery.id
        if event_id is not None:
            recent = self._recent_ids
            if event_id in recent or event_id in self._older_ids:
                # a publish retried after its first try had committed: seen already
                self.duplicates += 1
                logger.debug("dropped duplicate event %s on %s", event_id, message.channel)
                return None
            recent.add(event_id)
            if len(recent) >= RECENT_IDS:
                self._older_ids = recent
                self._recent_ids = set()
        shared = False
        for sub in channel.route(delivery):
            # each subscription gets its own Delivery: retries count attempts on it
            sub.offer(_copy(delivery) if shared else delivery)
            shared = True
        return error

    async def _undecodable(self, message: Message, error: Exception) -> None:
        logger.warning("%s", error, extra={"channel": message.channel})
        await self._safe_hook("pgbus_on_decode_error", message=message, error=error)
        await self._dead_letter(DeadLetter.from_decode_error(message, error))

    def _handled(self, sub: Subscription, delivery: Delivery, duration: float) -> None:
        try:
            self._hook.pgbus_on_handled(subscription=sub, delivery=delivery, duration=duration)
        except Exception:
            logger.exception("plugin hook pgbus_on_handled failed")

    async def _failed(self, sub: Subscription, delivery: Delivery, error: BaseException) -> None:
        logger.error(
            "handler %s failed on %s: %r",
            sub.name,
            delivery.channel,
            error,
            exc_info=error,
            extra={"channel": delivery.channel},
        )
        await self._safe_hook(
            "pgbus_on_handler_error", subscription=sub, delivery=delivery, error=error
        )
        await self._dead_letter(DeadLetter.from_failure(sub, delivery, error))

    async def _dead_letter(self, dead_letter: DeadLetter) -> None:
        await self._safe_hook("pgbus_on_dead_letter", dead_letter=dead_letter)

    def _dropped(self, sub: Subscription, delivery: Delivery, policy: Overflow) -> None:
        self._hook.pgbus_on_dropped(subscription=sub, delivery=delivery, policy=policy)

    async def _safe_hook(self, name: str, **kwargs: Any) -> None:
        """Call an observer hook; a failing plugin is logged, never stops the bus."""
        try:
            await await_all(getattr(self._hook, name)(**kwargs))
        except Exception:
            logger.exception("plugin hook %s failed", name)

    # -- listener host protocol ---------------------------------------------------------------

    async def _on_connected(
        self, channels: Sequence[str], disconnected_at: float | None, reconnected_at: float
    ) -> None:
        await self._safe_hook("pgbus_on_connect", bus=self, channels=channels)
        if disconnected_at is not None:
            self._start_resyncs(disconnected_at, reconnected_at)
            await self._safe_hook(
                "pgbus_on_resync",
                bus=self,
                channels=channels,
                disconnected_at=disconnected_at,
                reconnected_at=reconnected_at,
            )

    async def _on_disconnected(self, error: BaseException | None) -> None:
        await self._safe_hook("pgbus_on_disconnect", bus=self, error=error)

    async def _on_terminal_error(self, error: ListenerError) -> None:
        await self._safe_hook("pgbus_on_terminal_error", bus=self, error=error)

    def _start_resyncs(self, disconnected_at: float, reconnected_at: float) -> None:
        """Run every subscription's ``on_resync`` in a task, its deliveries held meanwhile."""
        for name, (callback, gate) in self._resync.items():
            sub = self._subscriptions.get(name)
            if sub is None:
                continue
            gate.clear()
            gap = Gap(sub.channels, disconnected_at, reconnected_at)
            previous = self._resync_tasks.get(name)
            if previous is not None:
                previous.cancel()
            self._resync_tasks[name] = asyncio.create_task(
                self._resync_one(sub, callback, gate, gap), name=f"pgbus-resync-{name}"
            )

    async def _resync_one(
        self, sub: Subscription, callback: ResyncCallback, gate: asyncio.Event, gap: Gap
    ) -> None:
        try:
            result = callback(gap)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_resync of %s failed", sub.name)
        finally:
            if self._resync_tasks.get(sub.name) is asyncio.current_task():
                del self._resync_tasks[sub.name]
                gate.set()

    def _backoff(self, attempt: int, error: BaseException | None) -> float | None:
        delay: float | None = self._hook.pgbus_reconnect_backoff(attempt=attempt, error=error)
        return delay


def _resync_gate(gate: asyncio.Event) -> Middleware:
    """A middleware that holds deliveries while ``gate`` is closed (a resync runs)."""

    async def wait_for_resync(delivery: Delivery, call_next: CallNext) -> None:
        if not gate.is_set():
            await gate.wait()
        await call_next(delivery)

    return wait_for_resync


def _copy(delivery: Delivery) -> Delivery:
    return Delivery(
        delivery.message,
        delivery.event,
        delivery.id,
        delivery.published_at,
        delivery.headers,
        delivery.attempt,
    )


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
