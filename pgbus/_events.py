"""Events (typed pydantic models bound to a channel), raw messages and deliveries."""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from pydantic import BaseModel

from pgbus._channels import check_channel

if TYPE_CHECKING:
    from collections.abc import Mapping


class Event(BaseModel):
    """Base class of typed events: a pydantic model bound to a channel.

    Bind the channel with a class keyword; subclasses inherit it::

        class OrderPlaced(pgbus.Event, channel="orders"):
            order_id: int
            total: Decimal

    The envelope's ``type`` field names the model on the wire; it defaults to the class
    name and can be set with ``event_type="order.placed"``. Several event types may share
    one channel.

    .. versionadded:: 0.1.0
    """

    pgbus_channel: ClassVar[str | None] = None
    pgbus_type: ClassVar[str] = "Event"

    def __init_subclass__(
        cls,
        channel: str | None = None,
        event_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if channel is not None:
            cls.pgbus_channel = check_channel(channel)
        cls.pgbus_type = event_type if event_type is not None else cls.__name__


#: A notification as the listener hands it over: ``(channel, payload, pid, received_at)``,
#: the fields of a :class:`Message` in order.
Notification: TypeAlias = tuple[str, str, int, float]


@dataclasses.dataclass(slots=True)
class Message:
    """A raw notification, as an untyped subscription receives it.

    :ivar channel: the channel it arrived on.
    :ivar payload: the payload string, exactly as sent.
    :ivar pid: the process id of the PostgreSQL backend that sent it.
    :ivar received_at: when the listener received it (``time.time()``).

    .. versionadded:: 0.1.0
    """

    channel: str
    payload: str
    pid: int
    received_at: float


#: The headers of a delivery without any: one shared, read-only empty mapping.
NO_HEADERS: Mapping[str, str] = types.MappingProxyType({})


@dataclasses.dataclass(slots=True)
class Delivery:
    """One notification on its way to handlers: the raw message and what was decoded.

    Plugins see deliveries in hooks and handler middleware; handlers get ``event``.

    :ivar message: the raw notification.
    :ivar event: the decoded event, or ``None`` for a channel without a model.
    :ivar id: the envelope's event id, when the payload was an envelope.
    :ivar published_at: the envelope's publish timestamp (``time.time()`` of the
        publisher), when there was one.
    :ivar headers: the envelope's headers (empty for bare payloads).
    :ivar attempt: the handler attempt this delivery is on, starting at 1.

    .. versionadded:: 0.1.0
    """

    message: Message
    event: Event | None = None
    id: str | None = None
    published_at: float | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: NO_HEADERS)
    attempt: int = 1

    @property
    def channel(self) -> str:
        """The channel the notification arrived on."""
        return self.message.channel
