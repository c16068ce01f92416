"""The built-in codec: pydantic models in the pgbus JSON envelope.

On the wire an event is compact JSON::

    {"v":1,"id":"<hex>","type":"OrderPlaced","ts":1732530000.25,"headers":{…},"data":{…}}

``headers`` is left out when empty. Decoding validates the whole envelope, the event's
fields included, in one pass of pydantic's Rust core. When several models share a
channel the ``type`` field picks the model (a discriminated union). A bare JSON object
that is not an envelope (a trigger's ``row_to_json(NEW)``, a hand-written ``NOTIFY``)
decodes against the channel's model when the channel has exactly one.

An envelope whose ``type`` no subscription on this process knows is not an error: it
becomes a delivery without an event, which only untyped subscriptions receive.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Union

import pydantic
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from pgbus._events import NO_HEADERS, Delivery, Event, Message
from pgbus._markers import hookimpl
from pgbus.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from pgbus._events import Decoder, Encoder, Outgoing

ENVELOPE_VERSION = 1


def envelope_type(event_type: type[Event]) -> Any:
    """The envelope of ``event_type`` as a ``TypedDict``, for pydantic to validate.

    A ``TypedDict`` validates to a plain dict: no model instance per envelope, about a
    quarter cheaper than a model around the event. Extra keys are ignored; ``headers``
    may be left out. ``pgbus schema`` writes its JSON Schema.
    """
    type_name: Any = Literal[event_type.pgbus_type]  # a literal built at run time
    fields: dict[str, Any] = {
        "v": int,
        "id": str,
        "type": type_name,
        "ts": float,
        "headers": NotRequired[dict[str, str]],
        "data": event_type,
    }
    return TypedDict(f"{event_type.__name__}Envelope", fields)  # type: ignore[operator]  # a TypedDict built at run time


@hookimpl(trylast=True)
def pgbus_encoder(event_type: type[Event]) -> Encoder:
    """Encode events of ``event_type`` as the pgbus JSON envelope."""
    head = f'{{"v":{ENVELOPE_VERSION},"type":{json.dumps(event_type.pgbus_type)},"id":"'
    # the model's own serializer, as model_dump_json() uses it, minus that method's wrapper
    to_json = event_type.__pydantic_serializer__.to_json
    last: list[tuple[float, str]] = [(math.nan, "")]  # the last ts and its text: a batch shares one

    def encode(out: Outgoing) -> str:
        data = to_json(out.event).decode() if out.event is not None else "null"
        stamp = last[0]
        if out.ts != stamp[0]:
            stamp = last[0] = (out.ts, repr(out.ts))
        if out.headers:
            headers = json.dumps(out.headers, separators=(",", ":"), ensure_ascii=False)
            return f'{head}{out.id}","ts":{stamp[1]},"headers":{headers},"data":{data}}}'
        return f'{head}{out.id}","ts":{stamp[1]},"data":{data}}}'

    return encode


def _raw_decoder(message: Message) -> Delivery:
    return Delivery(message)


def _unknown_type(payload: str, known: set[str]) -> dict[str, Any] | None:
    """Return the envelope when ``payload`` is a valid envelope of a type not in ``known``."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("type"), str)
        and obj["type"] not in known
        and "data" in obj
        and isinstance(obj.get("id"), str)
    ):
        return obj
    return None


@hookimpl(trylast=True)
def pgbus_decoder(channel: str, event_types: Sequence[type[Event]]) -> Decoder:
    """Decode pgbus envelopes (and bare objects) into ``event_types``."""
    if not event_types:
        return _raw_decoder
    envelopes = [envelope_type(t) for t in event_types]
    envelope: Any = envelopes[0]
    if len(envelopes) > 1:
        union: Any = Union.__getitem__(tuple(envelopes))  # a union built at run time
        envelope = Annotated[union, pydantic.Field(discriminator="type")]
    validate: Callable[[str], dict[str, Any]] = pydantic.TypeAdapter(envelope).validate_json
    bare = event_types[0].model_validate_json if len(event_types) == 1 else None
    known = {t.pgbus_type for t in event_types}

    def decode(message: Message) -> Delivery:
        payload = message.payload
        try:
            env = validate(payload)
        except pydantic.ValidationError as envelope_error:
            return _fallback(message, envelope_error)
        return Delivery(message, env["data"], env["id"], env["ts"], env.get("headers", NO_HEADERS))

    def _fallback(message: Message, envelope_error: pydantic.ValidationError) -> Delivery:
        payload = message.payload
        other = _unknown_type(payload, known)
        if other is not None:
            ts = other.get("ts")
            headers = other.get("headers")
            return Delivery(
                message,
                None,
                other["id"],
                ts if isinstance(ts, float | int) else None,
                headers if isinstance(headers, dict) else NO_HEADERS,
            )
        if bare is None:
            reason = _reason(envelope_error)
            raise DecodeError(channel, payload, reason) from envelope_error
        try:
            return Delivery(message, bare(payload))
        except pydantic.ValidationError as bare_error:
            looks_enveloped = '"data"' in payload and '"type"' in payload
            error = envelope_error if looks_enveloped else bare_error
            raise DecodeError(channel, payload, _reason(error)) from error

    return decode


def _reason(error: pydantic.ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
