"""Every hook of pgbus: the reference for plugin authors.

A plugin is any object (a module, a class instance) with functions named after these
hooks and marked with :data:`pgbus.hookimpl`. Hook names start with ``pgbus_``; the plugin
manager refuses a marked function whose name is not a hook here (so a typo fails fast).

Three kinds of hooks:

* **factory hooks** (``pgbus_encoder``, ``pgbus_decoder``, ``pgbus_router``,
  ``pgbus_handler_middleware``) are called once per event type, channel or subscription,
  never per event. What they return is cached and called on the hot path. The first
  three are ``firstresult``: the first implementation that returns something other
  than ``None`` wins, and the built-in one runs last, so registering a plugin replaces it.
* **observer hooks** are called for every implementation. The per-event ones
  (``pgbus_on_published``, ``pgbus_on_received``, ``pgbus_on_handled``) and the
  watchdog ones (``pgbus_on_slow_handler``, ``pgbus_on_dropped``) must be synchronous
  and quick; the others may be ``async def`` and are awaited.
* **strategy hooks** (``pgbus_reconnect_backoff``) are ``firstresult``.

``firstresult`` hooks must be synchronous: pluggy has no async, and a coroutine would
count as a result. Registering an ``async def`` implementation of one raises
:class:`pgbus.PluginError`.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping, Sequence

    from pgbus._bus import Bus
    from pgbus._drivers import AsyncConnection
    from pgbus._events import DeadLetter, Decoder, Delivery, Encoder, Event, Message, Outgoing
    from pgbus._subscription import Middleware, Overflow, Router, Subscription
    from pgbus.errors import ListenerError

hookspec = pluggy.HookspecMarker("pgbus")

# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------


@hookspec(historic=True)
def pgbus_configure(bus: Bus) -> None:
    """Called once for each plugin when the :class:`~pgbus.Bus` is created.

    Historic: a plugin registered later is called at registration.

    :param bus: the bus the plugin was registered with.

    .. versionadded:: 0.1.0
    """


# --------------------------------------------------------------------------------------
# The data path: encoding, decoding, routing, handling (factory hooks, called once)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pgbus_encoder(event_type: type[Event]) -> Encoder | None:
    """Return the function that turns an event of ``event_type`` into a NOTIFY payload.

    Called once per event type; the result is cached. The encoder receives an
    :class:`~pgbus.types.Outgoing` (the event, its id, timestamp and headers) and returns
    the payload ``str``. Stops at the first non-``None`` result. The built-in codec
    writes the pgbus envelope ``{"v":1,"id":…,"type":…,"ts":…,"data":{…}}``.

    :param event_type: the :class:`~pgbus.Event` subclass being published.
    :returns: an encoder, or ``None`` to leave it to the next plugin.

    .. versionadded:: 0.1.0
    """


@hookspec(firstresult=True)
def pgbus_decoder(channel: str, event_types: Sequence[type[Event]]) -> Decoder | None:
    """Return the function that turns a notification on ``channel`` into a delivery.

    Called whenever the set of models subscribed on ``channel`` changes; the result is
    cached. The decoder receives a :class:`~pgbus.Message` and returns a
    :class:`~pgbus.Delivery` whose ``event`` is an instance of one of ``event_types``;
    it raises any exception to reject the payload (which then goes to
    :func:`pgbus_on_decode_error`). Stops at the first non-``None`` result.

    :param channel: the channel name.
    :param event_types: the models subscribed on it (empty: untyped subscriptions only).
    :returns: a decoder, or ``None`` to leave it to the next plugin.

    .. versionadded:: 0.1.0
    """


@hookspec(firstresult=True)
def pgbus_router(channel: str, subscriptions: Sequence[Subscription]) -> Router | None:
    """Return the function that picks the subscriptions a delivery goes to.

    Called whenever the subscriptions on ``channel`` change; the result is cached. The
    router receives a :class:`~pgbus.Delivery` and returns the subscriptions (in order)
    that should handle it. Stops at the first non-``None`` result. The built-in router
    matches typed subscriptions by event type and gives every message to untyped ones.

    :param channel: the channel name.
    :param subscriptions: every subscription listening on ``channel``.
    :returns: a router, or ``None`` to leave it to the next plugin.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_handler_middleware(subscription: Subscription) -> Middleware | None:
    """Return a middleware to wrap around every invocation of ``subscription``'s handler.

    Called once per subscription. A middleware is ``async def mw(delivery, call_next)``
    and must ``await call_next(delivery)`` to go on (or not, to skip the handler, or
    several times, to retry). The results of all plugins are composed with the
    last-registered plugin outermost. Awaiting ``call_next`` gives what the rest of the
    chain returned: the handler's return value at the innermost layer (the built-in
    ``reply`` plugin sends it back to a :meth:`Bus.request <pgbus.Bus.request>`). Only
    that innermost layer needs it; a middleware may return ``None``.

    :param subscription: the subscription being set up.
    :returns: a middleware, or ``None``.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``call_next`` returns the handler's return value.
    """


# --------------------------------------------------------------------------------------
# Publishing (a strategy hook, called per publish)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pgbus_publish(
    bus: Bus, outgoing: Sequence[Outgoing], connection: AsyncConnection | None
) -> Awaitable[None] | None:
    """Take over sending encoded events, instead of the built-in ``NOTIFY``.

    Called by :meth:`Bus.publish <pgbus.Bus.publish>` and
    :meth:`Bus.publish_many <pgbus.Bus.publish_many>` once the events are encoded (their
    ``payload`` is set), before anything is sent. Return an awaitable that sends them
    (the bus awaits it; it raises :class:`pgbus.PublishError` on failure), or ``None`` to
    leave them to the next plugin and, at last, to the built-in ``NOTIFY``. Only the
    built-in path refuses payloads of 8000 bytes or more: a plugin that takes over
    decides. Stops at the first non-``None`` result; implement it as a plain ``def``
    that returns a coroutine. The ``durable`` plugin uses it to journal events and
    notify in one transaction.

    :param bus: the bus publishing.
    :param outgoing: the events, in order, encoded.
    :param connection: the caller's connection (``publish(..., connection=conn)``), on
        which the events must be sent so they commit with the caller's transaction; or
        ``None``.
    :returns: an awaitable that sends them, or ``None``.

    .. versionadded:: 0.1.0
    """


@hookspec(firstresult=True)
def pgbus_schedule(
    bus: Bus, outgoing: Sequence[Outgoing], due: float, connection: AsyncConnection | None
) -> Awaitable[None] | None:
    """Take on events published for later (``publish(..., delay=...)`` or ``at=...``).

    Called instead of :func:`pgbus_publish` once the events are encoded. Return an
    awaitable that stores them so that they are delivered no earlier than ``due``, to the
    subscriptions that exist then, or ``None``; when no plugin answers, the publish
    raises :class:`pgbus.ConfigError` (delayed delivery needs durable mode). The
    ``durable`` plugin implements it.

    :param bus: the bus publishing.
    :param outgoing: the events, in order, encoded.
    :param due: when they are due, in seconds since the epoch.
    :param connection: the caller's connection, or ``None``.
    :returns: an awaitable that stores them, or ``None``.

    .. versionadded:: 0.3.0
    """


@hookspec(firstresult=True)
def pgbus_cancel(bus: Bus, event_id: str) -> Awaitable[bool] | None:
    """Cancel an event published for later that is not yet due (:meth:`Bus.cancel`).

    Return an awaitable resolving to whether it was cancelled, or ``None`` (no plugin
    answers: :meth:`Bus.cancel <pgbus.Bus.cancel>` raises :class:`pgbus.ConfigError`).

    :param bus: the bus.
    :param event_id: the id :meth:`Bus.publish <pgbus.Bus.publish>` returned.
    :returns: an awaitable of ``True`` when it was cancelled, or ``None``.

    .. versionadded:: 0.3.0
    """


@hookspec(firstresult=True)
def pgbus_resolve_reference(
    bus: Bus, message: Message, reference: Mapping[str, Any]
) -> Awaitable[Message | None] | None:
    """Take on a reference notification: fetch the event it points to.

    An event too large for NOTIFY travels as a reference envelope (``"type":
    "pgbus.ref"``, ``data`` naming where the event is stored: the ``durable`` plugin's
    ``{"journal_id": …, "type": …, "bytes": …}``). A reference is a pointer, never an
    event: the receive path does not decode it, but asks this hook for the event and
    decodes, verifies and routes that instead, to the plain subscriptions of the
    channel. (Durable subscriptions read the journal themselves; a channel with only
    durable subscriptions ignores references.) Return an awaitable that gives the
    stored event as a :class:`~pgbus.Message` (with ``stored_at`` and ``stored_id``
    set), or ``None`` once it is gone; returning ``None`` here leaves it to the next
    plugin, and with no plugin taking it the reference is a
    :class:`~pgbus.DecodeError`. Stops at the first non-``None`` result; implement it
    as a plain ``def`` that returns a coroutine.

    :param bus: the bus that received it.
    :param message: the reference notification.
    :param reference: the reference envelope, parsed (``v``, ``id``, ``type``, ``ts``,
        ``data``).
    :returns: an awaitable giving the stored event, or ``None``.

    .. versionadded:: 0.2.0
    """


# --------------------------------------------------------------------------------------
# Observers of the data path (called for every implementation)
# --------------------------------------------------------------------------------------


@hookspec
def pgbus_on_published(outgoing: Sequence[Outgoing]) -> None:
    """Called after events were sent with NOTIFY (sync; keep it quick).

    For a publish inside the caller's transaction this runs when the NOTIFY statement
    ran, before the transaction commits.

    :param outgoing: what was sent, in order; raw :meth:`Bus.notify` payloads have
        ``event=None``.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_received(messages: Sequence[Message]) -> None:
    """Called for each batch of notifications the listener takes in, before decoding.

    Synchronous and on the hot path: count, do not block.

    :param messages: the raw notifications, in arrival order.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_handled(subscription: Subscription, delivery: Delivery, duration: float) -> None:
    """Called after a handler returned normally (sync; keep it quick).

    Skipped entirely while no plugin implements it.

    :param subscription: whose handler ran.
    :param delivery: what it handled.
    :param duration: seconds the handler chain (with middleware) took.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_decode_error(message: Message, error: BaseException) -> Any:
    """Called when a notification cannot be decoded; may be ``async def``.

    The listener goes on with the next notification. The raw payload is in ``message``.
    When the server of a ``SQL_ASCII`` database ended the LISTEN session rather than send
    a notification that is not UTF-8, ``message.payload`` is empty (it never arrived) and
    ``message.channel`` is the bus's channel when it listens on one, else empty.

    :param message: the notification that was rejected.
    :param error: why (usually a :class:`pgbus.DecodeError`).

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_handler_error(
    subscription: Subscription, delivery: Delivery, error: BaseException
) -> Any:
    """Called when a handler (after its middleware, e.g. retries) raised; may be ``async def``.

    :param subscription: whose handler failed.
    :param delivery: the delivery it failed on.
    :param error: what it raised.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_retry(
    subscription: Subscription, delivery: Delivery, attempt: int, delay: float, error: BaseException
) -> Any:
    """Called when a handler attempt failed and will be retried; may be ``async def``.

    Called by the built-in retry plugin before it waits ``delay`` seconds; the next
    attempt is number ``attempt + 1``. A slow implementation delays the retry.

    :param subscription: whose handler failed.
    :param delivery: the delivery; its ``attempt`` is still the failed attempt's number.
    :param attempt: the number of the attempt that failed (1 for the first call).
    :param delay: seconds until the next attempt.
    :param error: what the attempt raised.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_dead_letter(dead_letter: DeadLetter) -> Any:
    """Called for every notification given up on; may be ``async def``.

    The bus makes a :class:`~pgbus.DeadLetter` when a notification cannot be decoded
    (``subscription`` is ``None``) and when a handler failed for good (after its
    retries, if any). It holds the raw payload, the error and the number of attempts.
    The built-in ``dead_letters`` plugin keeps the most recent ones in memory
    (``bus.dead_letters``) and logs them; a plugin that persists them implements this
    hook (an ``async def`` implementation is awaited before the next delivery of that
    subscription is handled).

    :param dead_letter: what was given up on, and why.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_slow_handler(subscription: Subscription, delivery: Delivery, elapsed: float) -> None:
    """Called when a handler attempt is still running past a threshold (sync; keep it quick).

    Called by the built-in ``timeouts`` plugin's watchdog, once per attempt and
    threshold: when it passes ``warn_after`` (default 10 s), and, for a subscription with
    ``on_timeout="report"``, when it passes its ``timeout``. The handler keeps running.

    :param subscription: whose handler is slow.
    :param delivery: what it is working on (``delivery.attempt`` is the attempt).
    :param elapsed: seconds it has been running.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_dropped(subscription: Subscription, delivery: Delivery, policy: Overflow) -> None:
    """Called when a subscription's full queue dropped a delivery (sync; keep it quick).

    Only the ``drop_oldest`` and ``drop_newest`` :class:`~pgbus.Overflow` policies drop;
    ``wait`` never does.

    :param subscription: whose queue was full.
    :param delivery: the delivery that was dropped (the oldest queued one, or the new
        one).
    :param policy: the policy that dropped it.

    .. versionadded:: 0.1.0
    """


# --------------------------------------------------------------------------------------
# Bus lifecycle
# --------------------------------------------------------------------------------------


@hookspec
def pgbus_on_start(bus: Bus) -> Any:
    """Called by :meth:`Bus.start <pgbus.Bus.start>` before it connects; may be ``async def``.

    The subscriptions' handlers are ready; the LISTEN connection is not up yet
    (:func:`pgbus_on_connect` follows). Unlike the observer hooks, an exception raised
    here is not swallowed: it fails ``start()`` (after :func:`pgbus_on_stop` ran), so a
    plugin can refuse to run, e.g. when its tables are missing.

    :param bus: the bus starting.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_stop(bus: Bus) -> Any:
    """Called by :meth:`Bus.stop <pgbus.Bus.stop>`; may be ``async def``.

    Runs once the LISTEN connection is closed and before the subscriptions' queues are
    drained, so a plugin that feeds deliveries can stop feeding and wait for what it
    handed over. Also called when ``start()`` fails, and when a bus that never started
    is stopped. Errors are logged, never raised.

    :param bus: the bus stopping.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_stopped(bus: Bus) -> Any:
    """Called by :meth:`Bus.stop <pgbus.Bus.stop>` once all handlers finished; may be ``async def``.

    Follows :func:`pgbus_on_stop` after the subscriptions' queues were drained, before
    the publish pool is closed: the moment to release what a plugin holds (its own
    connections). Also called when ``start()`` fails, and when a bus that never started
    is stopped. Errors are logged, never raised.

    :param bus: the bus stopping.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_migrate(bus: Bus) -> Any:
    """Create or upgrade the database objects a plugin owns; may be ``async def``.

    Called by :meth:`Bus.migrate <pgbus.Bus.migrate>` (and so by ``pgbus migrate``),
    never implicitly: a plugin must not change a database the user did not ask to
    change. Must be idempotent and safe when several processes run it at once.

    :param bus: the bus whose database to migrate (it need not be started).

    .. versionadded:: 0.1.0
    """


# --------------------------------------------------------------------------------------
# Connection lifecycle
# --------------------------------------------------------------------------------------


@hookspec
def pgbus_on_connect(bus: Bus, channels: Sequence[str]) -> Any:
    """Called each time the listener connection is up and listening; may be ``async def``.

    :param bus: the bus.
    :param channels: every channel LISTENed to on the new connection.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_disconnect(bus: Bus, error: BaseException | None) -> Any:
    """Called when the listener connection was lost; may be ``async def``.

    :param bus: the bus.
    :param error: why, when known.

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_resync(
    bus: Bus, channels: Sequence[str], disconnected_at: float, reconnected_at: float
) -> Any:
    """Called after a reconnect, once LISTEN is re-issued; may be ``async def``.

    Plain NOTIFY loses what was published in the gap, so this is the moment to catch up
    (rebuild a cache, replay a journal). Notifications that arrive while it runs are kept.

    :param bus: the bus.
    :param channels: the channels that may have missed events.
    :param disconnected_at: when the connection was lost (``time.time()``).
    :param reconnected_at: when LISTEN was re-established (``time.time()``).

    .. versionadded:: 0.1.0
    """


@hookspec
def pgbus_on_terminal_error(bus: Bus, error: ListenerError) -> Any:
    """Called when the bus stopped trying to reconnect; may be ``async def``.

    The backoff strategy (:func:`pgbus_reconnect_backoff`) returned ``None``, so the
    bus no longer listens. :meth:`~pgbus.Bus.wait_closed` and
    :meth:`~pgbus.Bus.run_forever` raise ``error``, and :attr:`~pgbus.Bus.status`
    reports ``failed``. Use it to alert, or to exit the process so that a supervisor
    (systemd, Kubernetes) restarts it. Not called when :meth:`~pgbus.Bus.start` fails:
    ``start()`` raises instead.

    :param bus: the bus.
    :param error: the terminal error; ``error.__cause__`` is the last connection error.

    .. versionadded:: 0.1.0
    """


@hookspec(firstresult=True)
def pgbus_reconnect_backoff(attempt: int, error: BaseException | None) -> float | None:
    """Return how many seconds to wait before connection attempt number ``attempt``.

    Stops at the first non-``None`` result. The built-in strategy (capped exponential
    with full jitter) runs last, so any registered strategy replaces it. When every
    implementation returns ``None`` the bus gives up and reports a
    :class:`pgbus.ListenerError` (see :func:`pgbus_on_terminal_error`).

    The same hook paces the retries of a publish whose pool connection broke; there
    ``None`` means the publish fails with :class:`pgbus.PublishError`. See
    ``docs/how-to/replace-backoff.md`` for complete strategies.

    :param attempt: 1 for the first retry after a failure, then 2, 3, …
    :param error: the error that ended the previous attempt or connection.
    :returns: seconds to wait, or ``None`` for no opinion (give up, if nobody has one).

    .. versionadded:: 0.1.0
    """
