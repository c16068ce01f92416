"""The Bus: subscriptions, the listener, the publisher and the plugins of one process."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
import typing
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from pgbus._channels import check_channel
from pgbus._events import Delivery, Event, Message
from pgbus._listener import Listener
from pgbus._plugins import PluginManager
from pgbus._publish import Connection, Publisher, check_size
from pgbus._subscription import DEFAULT_MAX_PENDING, Subscription
from pgbus._util import await_all, redact_dsn
from pgbus.errors import BusClosed, ConfigError
from pgbus.types import Outgoing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from types import TracebackType

    from pgbus.default_plugins.metrics import Metrics
    from pgbus.types import Decoder, Encoder, Handler, Router

logger = logging.getLogger(__name__)

H = TypeVar("H", bound="Handler")


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
    :param max_pending: default bound of each subscription's queue.
    :param connect_kwargs: extra keyword arguments for :func:`asyncpg.connect` (both the
        listener and the pool), e.g. ``ssl``.

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
        max_pending: int = DEFAULT_MAX_PENDING,
        connect_kwargs: Mapping[str, Any] | None = None,
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
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {value!r}")
        self.dsn = dsn
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_pending = max_pending
        self.plugins = PluginManager(
            plugins, load_entrypoints=load_entrypoints, disable_plugins=disable_plugins
        )
        self._hook = self.plugins.hook
        kwargs = dict(connect_kwargs or {})
        self._listener = Listener(
            dsn,
            self,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_kwargs=kwargs,
        )
        self._publisher = Publisher(
            dsn, connect_timeout=connect_timeout, pool_max_size=pool_max_size, connect_kwargs=kwargs
        )
        self._state = BusState.NEW
        self._subscriptions: dict[str, Subscription] = {}
        self._channels: dict[str, _Channel] = {}
        self._encoders: dict[type[Event], Encoder] = {}
        self._inbound: deque[Message] = deque()
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
    ) -> Callable[[H], H]: ...
    def subscribe(
        self,
        *targets: Any,
        name: str | None = None,
        concurrency: int = 1,
        max_pending: int | None = None,
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
        :raises BusClosed: when the bus is already running (use :meth:`listen`).
        :raises InvalidChannel: for a bad channel name.
        :raises ConfigError: for anything else it cannot subscribe to.
        """
        if len(targets) == 1 and callable(targets[0]) and not _is_target(targets[0]):
            handler = targets[0]
            self._add(self._make(handler, (), name, concurrency, max_pending))
            return handler

        def decorate(handler: H) -> H:
            self._add(self._make(handler, targets, name, concurrency, max_pending))
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
    ) -> Subscription:
        """Subscribe ``handler`` to ``target``; while running, LISTEN before returning.

        Takes the same arguments as :meth:`subscribe`.

        :returns: the new :class:`Subscription`.
        """
        self._check_open()
        targets = tuple(target) if isinstance(target, list | tuple) else (target,)
        sub = self._make(handler, targets, name, concurrency, max_pending)
        self._add(sub, running_ok=True)
        if self._state is BusState.RUNNING:
            self._start_subscription(sub)
            for channel in sub.channels:
                await self._listener.listen(channel)
        return sub

    async def unlisten(self, target: str | type[Event] | Subscription) -> None:
        """Remove subscriptions: all on a channel, those of an event type, or one.

        Channels left without subscriptions are UNLISTENed at once while running.
        Deliveries already queued for a removed subscription are still handled.
        """
        self._check_open()
        if isinstance(target, Subscription):
            removed = [target] if self._subscriptions.get(target.name) is target else []
        elif isinstance(target, str):
            channel = check_channel(target)
            removed = [s for s in self._subscriptions.values() if channel in s.channels]
        else:
            removed = [s for s in self._subscriptions.values() if target in s.event_types]
        channels_before = set(self._channels)
        for sub in removed:
            del self._subscriptions[sub.name]
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
    ) -> Subscription:
        if not callable(handler):
            raise ConfigError(f"handler must be callable, not {type(handler).__name__}")
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
        )

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
                by_channel.setdefault(channel, []).append(sub)
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
            await self._listener.start(self.start_timeout)
        except BaseException:
            await self._shutdown(0)
            raise
        self._state = BusState.RUNNING
        logger.info("bus listening on %d channels at %s", len(self._channels), redact_dsn(self.dsn))

    def _start_subscription(self, sub: Subscription) -> None:
        middleware = [
            mw for mw in self._hook.pgbus_handler_middleware(subscription=sub) if mw is not None
        ]
        sub.start(middleware, self._handled if self._on_handled_wanted else None, self._failed)

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
            await self._publisher.close()
            return
        await self._shutdown(self.stop_timeout if timeout is None else timeout)

    async def _shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        self._state = BusState.STOPPING
        await self._listener.stop()
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

    # -- publishing ----------------------------------------------------------------------

    def _outgoing(self, event: Event, headers: Mapping[str, str] | None) -> Outgoing:
        if not isinstance(event, Event):
            raise ConfigError(
                f"publish takes a pgbus.Event, not {type(event).__name__}; "
                "use bus.notify(channel, text) for raw payloads"
            )
        cls = type(event)
        channel = cls.pgbus_channel
        if channel is None:
            raise ConfigError(f"{cls.__name__} has no channel (class keyword channel=...)")
        encode = self._encoders.get(cls)
        if encode is None:
            encode = self._hook.pgbus_encoder(event_type=cls)
            if encode is None:
                raise ConfigError(f"no plugin provides an encoder for {cls.__name__}")
            self._encoders[cls] = encode
        out = Outgoing(channel, event, uuid.uuid4().hex, time.time(), headers or {})
        out.payload = encode(out)
        check_size(channel, out.payload)
        return out

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
        :raises PayloadTooLarge: when the encoded event is 8000 bytes or more (nothing is sent).
        :raises PublishError: when PostgreSQL could not be reached.
        :raises BusClosed: after :meth:`stop`.
        """
        self._check_open()
        out = self._outgoing(event, headers)
        await self._publisher.send((out.channel,), (out.payload,), connection)
        self._hook.pgbus_on_published(outgoing=(out,))
        return out.id

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
        outs = [self._outgoing(event, headers) for event in events]
        if not outs:
            return []
        await self._publisher.send([o.channel for o in outs], [o.payload for o in outs], connection)
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

    # -- the receive path ----------------------------------------------------------------

    def _enqueue(self, message: Message) -> None:
        self._inbound.append(message)
        self._wakeup.set()

    async def _dispatch(self) -> None:
        inbound = self._inbound
        wakeup = self._wakeup
        on_received = self._hook.pgbus_on_received
        while True:
            if not inbound:
                if self._draining:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            batch = list(inbound)
            inbound.clear()
            on_received(messages=batch)
            for message in batch:
                await self._deliver(message)

    async def _deliver(self, message: Message) -> None:
        channel = self._channels.get(message.channel)
        if channel is None:  # UNLISTENed meanwhile
            return
        try:
            delivery = channel.decode(message)
        except Exception as exc:
            logger.warning("%s", exc, extra={"channel": message.channel})
            await self._safe_hook("pgbus_on_decode_error", message=message, error=exc)
            delivery = Delivery(message)
        for sub in channel.route(delivery):
            if not sub.offer(delivery):
                await sub.put(delivery)

    def _handled(self, sub: Subscription, delivery: Delivery, duration: float) -> None:
        self._hook.pgbus_on_handled(subscription=sub, delivery=delivery, duration=duration)

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
            await self._safe_hook(
                "pgbus_on_resync",
                bus=self,
                channels=channels,
                disconnected_at=disconnected_at,
                reconnected_at=reconnected_at,
            )

    async def _on_disconnected(self, error: BaseException | None) -> None:
        await self._safe_hook("pgbus_on_disconnect", bus=self, error=error)

    def _backoff(self, attempt: int, error: BaseException | None) -> float | None:
        delay: float | None = self._hook.pgbus_reconnect_backoff(attempt=attempt, error=error)
        return delay


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
