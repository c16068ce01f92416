"""Types that plugins and handlers are written against.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from pgbus._events import Delivery, Event, Message
    from pgbus._subscription import Subscription


@dataclasses.dataclass(slots=True)
class Outgoing:
    """An event (or raw payload) on its way out, as encoders and observers see it.

    :ivar channel: the channel it is published on.
    :ivar event: the event, or ``None`` for a raw :meth:`Bus.notify` payload.
    :ivar id: the event's unique id (the idempotency key; also keeps identical events in
        one transaction from being collapsed by PostgreSQL).
    :ivar ts: the publish timestamp (``time.time()``).
    :ivar headers: string headers carried in the envelope (tracing context, …).
    :ivar payload: the encoded payload, once encoded.
    """

    channel: str
    event: Event | None
    id: str
    ts: float
    headers: Mapping[str, str]
    payload: str = ""


#: Turns an outgoing event into the NOTIFY payload.
Encoder: TypeAlias = Callable[[Outgoing], str]
#: Turns a notification into a delivery; raises to reject it.
Decoder: TypeAlias = Callable[["Message"], "Delivery"]
#: Picks the subscriptions a delivery goes to.
Router: TypeAlias = Callable[["Delivery"], Sequence["Subscription"]]
#: The rest of the handler chain, as a middleware sees it.
CallNext: TypeAlias = Callable[["Delivery"], Awaitable[None]]
#: ``async def middleware(delivery, call_next) -> None``.
Middleware: TypeAlias = Callable[["Delivery", CallNext], Awaitable[None]]
#: A handler: ``async def`` or plain ``def`` (run in a worker thread), given the event
#: (typed subscriptions) or the :class:`~pgbus.Message` (untyped ones).
Handler: TypeAlias = Callable[[Any], Awaitable[None] | None]
