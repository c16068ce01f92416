"""What a handler may ask for besides the event: its delivery's :class:`Context`.

The handler's signature is read once, when it is subscribed: pgbus fills the first
positional parameter with the event (or the :class:`~pgbus.Message`) and a parameter
annotated :class:`Context` with the context; any other parameter without a default is a
:class:`~pgbus.ConfigError` then, not a failure of every delivery later.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pgbus._events import NO_HEADERS, Message
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pgbus._events import Delivery

__all__ = [
    "Context",
    "ContextParameter",
    "context_of",
    "context_parameter",
    "is_async",
    "with_context",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """The context of one delivery, for a handler parameter annotated ``pgbus.Context``.

    ::

        @bus.subscribe(OrderPlaced)
        async def charge(event: OrderPlaced, context: pgbus.Context) -> None:
            if await already_charged(context.id):  # the idempotency key
                return

    :ivar id: the event's id (``None`` for a payload that is not a pgbus envelope).
    :ivar type: the envelope's event type name (``None`` for a bare payload).
    :ivar channel: the channel it arrived on.
    :ivar headers: the envelope's headers (empty when there are none).
    :ivar published_at: when it was published (aware, UTC); for a bare payload, when
        it was received.
    :ivar attempt: the handler attempt this is, 1 for the first.
    :ivar redelivered: whether the event was handed to this subscription before (a
        retry, or a durable redelivery).
    :ivar subscription: the subscription's name.

    .. versionadded:: 0.3.0
    """

    id: str | None
    type: str | None
    channel: str
    headers: Mapping[str, str]
    published_at: dt.datetime
    attempt: int
    redelivered: bool
    subscription: str


def context_of(subscription: str, delivery: Delivery) -> Context:
    """The :class:`Context` of ``delivery`` for the subscription named ``subscription``."""
    event_id, published, headers = delivery.id, delivery.published_at, delivery.headers
    event = delivery.event
    type_name = event.pgbus_type if event is not None else None
    if event is None:  # an untyped delivery: its envelope, if any, was not decoded
        envelope = _envelope(delivery.message.payload)
        if envelope is not None:
            type_name = envelope.get("type") if isinstance(envelope.get("type"), str) else None
            event_id = event_id or _str(envelope.get("id"))
            if published is None and isinstance(envelope.get("ts"), int | float):
                published = float(envelope["ts"])
            if not headers and isinstance(envelope.get("headers"), dict):
                headers = {str(k): str(v) for k, v in envelope["headers"].items()}
    when = published if published is not None else delivery.message.received_at
    attempt = delivery.attempt
    return Context(
        id=event_id,
        type=type_name,
        channel=delivery.message.channel,
        headers=headers or NO_HEADERS,
        published_at=dt.datetime.fromtimestamp(when, dt.UTC),
        attempt=attempt,
        redelivered=delivery.redelivered or attempt > 1,
        subscription=subscription,
    )


def _envelope(payload: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and "v" in obj and "type" in obj else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True, slots=True)
class ContextParameter:
    """Where a handler takes its :class:`Context`: by keyword ``name``, or second positionally."""

    name: str
    positional: bool


def context_parameter(
    handler: Callable[..., Any], subscription: str, *, batch: bool = False
) -> ContextParameter | None:
    """Check that pgbus can call ``handler``; where it takes a :class:`Context`, if anywhere.

    :param handler: the user's handler.
    :param subscription: names the subscription in the error.
    :param batch: whether it is a batch handler (it takes a list, and no context yet).
    :returns: the context parameter, or ``None`` when the handler takes none.
    :raises ConfigError: for a handler without a parameter for the event, or with a
        parameter that has no default and that pgbus cannot fill.
    """
    try:
        signature = inspect.signature(handler, eval_str=True)
    except (TypeError, ValueError):  # no signature to read (a builtin): called with the event
        return None
    except Exception:  # an annotation that cannot be resolved: read them as written
        signature = inspect.signature(handler)
    params = list(signature.parameters.values())
    _check_event_parameter(params, subscription)
    found: ContextParameter | None = None
    for index, param in enumerate(params[1:], start=1):
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if param.annotation is Context:
            if found is not None:
                raise ConfigError(
                    f"subscription {subscription!r}: its handler takes two pgbus.Context"
                    f" parameters, {found.name!r} and {param.name!r}"
                )
            if param.kind is inspect.Parameter.POSITIONAL_ONLY and index != 1:
                raise ConfigError(
                    f"subscription {subscription!r}: the positional-only pgbus.Context"
                    f" parameter {param.name!r} must come right after the event"
                )
            found = ContextParameter(param.name, param.kind is inspect.Parameter.POSITIONAL_ONLY)
        elif param.default is inspect.Parameter.empty:
            what = param.annotation
            named = "" if what is inspect.Parameter.empty else f" (annotated {_name(what)})"
            raise ConfigError(
                f"subscription {subscription!r}: pgbus cannot fill its handler's parameter"
                f" {param.name!r}{named}; it fills the event and a parameter annotated"
                " pgbus.Context, others need a default"
            )
    if batch:
        _check_batch_handler(params[0], found, subscription)
    return found


def _check_event_parameter(params: list[inspect.Parameter], subscription: str) -> None:
    """Refuse a handler without a first positional parameter for the event."""
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    if not params or params[0].kind not in positional:
        raise ConfigError(
            f"subscription {subscription!r}: its handler must take the event as its first"
            " positional parameter"
        )


def _check_batch_handler(
    param: inspect.Parameter, context: ContextParameter | None, subscription: str
) -> None:
    """Refuse a batch handler that takes one event (or message), or a context."""
    if context is not None:
        raise ConfigError(
            f"subscription {subscription!r}: a batch handler gets no pgbus.Context"
            f" (parameter {context.name!r}) yet"
        )
    what = param.annotation
    if isinstance(what, type) and issubclass(what, BaseModel | Message):
        raise ConfigError(
            f"subscription {subscription!r}: a batch handler gets a list; annotate"
            f" {param.name!r} as list[{what.__qualname__}]"
        )


def _name(annotation: object) -> str:
    return getattr(annotation, "__qualname__", None) or repr(annotation)


def with_context(
    handler: Callable[..., Any],
    parameter: ContextParameter,
    subscription: str,
    argument: Callable[[Delivery], Any],
) -> Callable[[Delivery], Any]:
    """``handler`` as a function of the delivery: its ``argument`` and its context.

    The result is ``async def`` when ``handler`` is, so it is still run in the loop.
    """
    key, positional = parameter.name, parameter.positional

    def call(delivery: Delivery) -> Any:
        context = context_of(subscription, delivery)
        if positional:
            return handler(argument(delivery), context)
        return handler(argument(delivery), **{key: context})

    if is_async(handler):

        async def call_async(delivery: Delivery) -> Any:
            return await call(delivery)

        return call_async
    return call


def is_async(handler: Callable[..., Any]) -> bool:
    """Whether calling ``handler`` returns a coroutine (``async def``, async ``__call__``)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
    )
