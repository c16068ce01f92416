"""The values of the data path: events, raw messages, deliveries, outgoing events, dead letters.

Everything here is a plain value with no behaviour of its own that needs the bus: the
bottom layer, imported by every other module (httpx's ``_models``).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, TypeAlias

from pydantic import BaseModel

from pgbus._channels import check_channel


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
    :ivar stored_at: for an event read from the durable journal (a durable
        subscription's delivery, a redelivered dead letter, a reference resolved for a
        plain subscription), when its journal row was written (``time.time()`` scale);
        ``None`` for a notification. Verifiers measure freshness from it: a journal row
        may be delivered long after it was published.
    :ivar stored_id: the event id the journal row is stored under, with ``stored_at``
        (the envelope's id must be the same).

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0 ``stored_at`` and ``stored_id``.
    """

    channel: str
    payload: str
    pid: int
    received_at: float
    stored_at: float | None = None
    stored_id: str | None = None


#: The ``type`` of a reference envelope: a pointer to an event too large for NOTIFY.
REFERENCE_TYPE = "pgbus.ref"
#: What every reference payload holds (``reference_of`` parses only such payloads).
REFERENCE_MARK = f'"{REFERENCE_TYPE}"'


def reference_of(payload: str) -> dict[str, Any] | None:
    """The reference envelope ``payload`` is, parsed; ``None`` for anything else.

    Cheap for everything else: only a payload holding ``"pgbus.ref"`` is parsed.
    """
    if REFERENCE_MARK not in payload:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if (
        isinstance(obj, dict)
        and obj.get("type") == REFERENCE_TYPE
        and isinstance(obj.get("id"), str)
        and isinstance(obj.get("data"), dict)
    ):
        return obj
    return None


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
    :ivar redelivered: whether it was handed to its subscription before and is queued
        again (a :class:`~pgbus.Nack`, a durable redelivery).

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``redelivered``.
    """

    message: Message
    event: Event | None = None
    id: str | None = None
    published_at: float | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: NO_HEADERS)
    attempt: int = 1
    redelivered: bool = False

    @property
    def channel(self) -> str:
        """The channel the notification arrived on."""
        return self.message.channel


_REDELIVERED = operator.attrgetter("redelivered")


@dataclasses.dataclass(slots=True)
class Batch(Delivery):
    """The deliveries a batch handler (``subscribe(..., batch=N)``) gets at once.

    It is one delivery to the handler chain: middleware, retries and timeouts see it
    whole, it is retried whole, and when it fails for good each of its events becomes a
    dead letter. Its other fields are those of its first delivery (``attempt`` too: a
    durable batch comes from one batch row, whose events share their attempt), except
    ``redelivered``, set when any of its deliveries was.

    :ivar deliveries: the deliveries, in the order they were queued.

    .. versionadded:: 0.3.0
    """

    deliveries: list[Delivery] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, deliveries: list[Delivery]) -> Batch:
        """The batch of ``deliveries`` (at least one), with the first one's fields."""
        first = deliveries[0]
        return cls(
            first.message,
            None,
            first.id,
            first.published_at,
            first.headers,
            first.attempt,
            any(map(_REDELIVERED, deliveries)),
            deliveries=deliveries,
        )


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

    .. versionadded:: 0.1.0
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
Decoder: TypeAlias = Callable[[Message], Delivery]


class _Named(Protocol):
    """Anything with a name: what a dead letter needs of a subscription."""

    @property
    def name(self) -> str: ...


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A notification that could not be decoded, or an event whose handler gave up.

    :ivar channel: the channel it arrived on.
    :ivar payload: the raw payload, exactly as received.
    :ivar error: why: the :class:`~pgbus.DecodeError`, or what the handler raised last.
    :ivar attempts: how many times the handler ran (0 for a decode failure).
    :ivar subscription: the name of the subscription whose handler failed (``None`` for a
        decode failure).
    :ivar at: when it was given up (``time.time()``).
    :ivar id: the event's id from the envelope, when there was one.
    :ivar published_at: the publish timestamp from the envelope, when there was one.

    .. versionadded:: 0.1.0
    """

    channel: str
    payload: str
    error: BaseException
    attempts: int
    subscription: str | None = None
    at: float = dataclasses.field(default_factory=time.time)
    id: str | None = None
    published_at: float | None = None

    @classmethod
    def from_decode_error(cls, message: Message, error: BaseException) -> DeadLetter:
        """The dead letter of a notification that could not be decoded.

        :param message: the notification.
        :param error: why it was rejected.
        :returns: a dead letter with ``attempts=0`` and no subscription.
        """
        return cls(message.channel, message.payload, error, 0)

    @classmethod
    def from_failure(
        cls, subscription: _Named, delivery: Delivery, error: BaseException
    ) -> DeadLetter:
        """The dead letter of a delivery whose handler failed for good.

        :param subscription: whose handler failed (anything with a ``name``).
        :param delivery: what it failed on (its ``attempt`` is the number of attempts).
        :param error: what the handler raised last.
        :returns: the dead letter.
        """
        return cls(
            delivery.message.channel,
            delivery.message.payload,
            error,
            delivery.attempt,
            subscription.name,
            id=delivery.id,
            published_at=delivery.published_at,
        )
