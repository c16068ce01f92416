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
  (``pgbus_on_published``, ``pgbus_on_received``, ``pgbus_on_handled``) must be
  synchronous and quick; the others may be ``async def`` and are awaited.
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
    from collections.abc import Sequence

    from pgbus._bus import Bus
    from pgbus._events import Delivery, Event, Message
    from pgbus._subscription import Subscription
    from pgbus.types import Decoder, Encoder, Middleware, Outgoing, Router

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
    last-registered plugin outermost.

    :param subscription: the subscription being set up.
    :returns: a middleware, or ``None``.

    .. versionadded:: 0.1.0
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


@hookspec(firstresult=True)
def pgbus_reconnect_backoff(attempt: int, error: BaseException | None) -> float | None:
    """Return how many seconds to wait before connection attempt number ``attempt``.

    Stops at the first non-``None`` result. The built-in strategy (capped exponential
    with full jitter) runs last, so any registered strategy replaces it. When every
    implementation returns ``None`` the bus gives up and reports a
    :class:`pgbus.ListenerError`.

    :param attempt: 1 for the first retry after a failure, then 2, 3, …
    :param error: the error that ended the previous attempt or connection.
    :returns: seconds to wait, or ``None`` for no opinion (give up, if nobody has one).

    .. versionadded:: 0.1.0
    """
