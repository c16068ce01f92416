"""The built-in codec: pydantic models in the pgbus JSON envelope.

On the wire an event is compact JSON::

    {"v":1,"id":"<hex>","type":"OrderPlaced","ts":1732530000.25,"headers":{…},"data":{…}}

``headers`` is left out when empty. The format is written down for other languages in
``docs/reference/wire-format.md``; its JSON Schema is :func:`wire_schema`.

A JSON object is an *envelope* when it has both the keys ``v`` and ``type``
(:func:`is_envelope`); any other payload is *bare*. An envelope is validated whole, the
event's fields included, in one pass of pydantic's Rust core; when several models share a
channel its ``type`` picks the model (a discriminated union). An envelope that does not
validate is a :class:`~pgbus.DecodeError`, never a bare object: an unknown ``v``, a
``ts`` that is not a number of seconds (a string, or milliseconds), a missing or invalid
``data``. A bare JSON object (a trigger's ``row_to_json(NEW)``, a hand-written
``NOTIFY``, a Go struct with fields ``id``, ``type`` and ``data``) decodes against the
channel's model when the channel has exactly one, and its failure is the model's.

A valid envelope whose ``type`` no subscription on this process knows is not an error:
it becomes a delivery without an event, which only untyped subscriptions receive.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Union

import pydantic
import pydantic_core
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from pgbus._events import NO_HEADERS, Delivery, Event, Message
from pgbus._markers import hookimpl
from pgbus.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from pgbus._events import Decoder, Encoder, Outgoing

ENVELOPE_VERSION = 1
#: The keys that, both present, make a JSON object an envelope.
ENVELOPE_KEYS = ("v", "type")
#: The first ``ts`` refused: 10^11 seconds is the year 5138, 10^11 milliseconds is 1973,
#: so a timestamp in milliseconds is refused rather than read as seconds.
TS_LIMIT = 1e11

_Seconds = Annotated[
    float,
    pydantic.Field(
        strict=True,
        ge=0,
        lt=TS_LIMIT,
        description="When it was published: seconds since the Unix epoch, a JSON number"
        " (not milliseconds, not a string).",
    ),
]
_Id = Annotated[
    str,
    pydantic.Field(
        min_length=1,
        description="The event's unique id: receivers drop an id they saw recently.",
    ),
]
_VERSION = Annotated[
    int,
    pydantic.Field(
        strict=True,  # not true, not 1.0
        ge=ENVELOPE_VERSION,
        le=ENVELOPE_VERSION,
        description=f"Always {ENVELOPE_VERSION}.",
        json_schema_extra={"const": ENVELOPE_VERSION},
    ),
]
_TYPE = pydantic.Field(description="The event type's name (the model's event_type).")
_HEADERS = Annotated[
    dict[str, str], pydantic.Field(description="String headers (tracing context, …).")
]
_DATA = pydantic.Field(description="The event: a JSON object the model of `type` validates.")


def is_envelope(obj: object) -> bool:
    """Whether the decoded JSON value ``obj`` is an envelope: an object with ``v`` and ``type``.

    .. versionadded:: 0.2.0
    """
    return isinstance(obj, dict) and all(key in obj for key in ENVELOPE_KEYS)


def envelope_type(event_type: type[Event] | None) -> Any:
    """The envelope of ``event_type`` as a ``TypedDict``, for pydantic to validate.

    A ``TypedDict`` validates to a plain dict: no model instance per envelope, about a
    quarter cheaper than a model around the event. Extra keys are ignored; ``headers``
    may be left out. ``pgbus schema`` writes its JSON Schema. Without ``event_type``, the
    envelope of any type, its ``data`` any JSON object.
    """
    name = "Any" if event_type is None else event_type.__name__
    type_name: Any = str if event_type is None else Literal[event_type.pgbus_type]
    data: Any = dict[str, Any] if event_type is None else event_type
    fields: dict[str, Any] = {
        "v": _VERSION,
        "id": _Id,
        "type": Annotated[type_name, _TYPE],
        "ts": _Seconds,
        "headers": NotRequired[_HEADERS],
        "data": Annotated[data, _DATA],
    }
    make: Any = TypedDict  # a TypedDict built at run time
    envelope = make(f"{name}Envelope", fields)
    # Cache the parser's strings for keys only: an envelope's values (its id above all)
    # are new every time, and caching them costs more than it saves.
    envelope.__pydantic_config__ = pydantic.ConfigDict(cache_strings="keys")
    return envelope


def wire_schema() -> dict[str, Any]:
    """The JSON Schema of every pgbus envelope (version 1), whatever its type.

    The one source of the schema on the wire-format page; ``pgbus schema`` gives the
    schema of one model's envelope, its ``data`` the model.

    .. versionadded:: 0.2.0
    """
    schema: dict[str, Any] = pydantic.TypeAdapter(envelope_type(None)).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"pgbus envelope, version {ENVELOPE_VERSION}"
    return schema


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
    # the validator itself: TypeAdapter.validate_json is a Python wrapper around it
    validator = pydantic.TypeAdapter(envelope).validator
    validate: Callable[[str], dict[str, Any]] = validator.validate_json
    bare = event_types[0].model_validate_json if len(event_types) == 1 else None
    known = {t.pgbus_type for t in event_types}

    def decode(message: Message) -> Delivery:
        try:
            env = validate(message.payload)
        except pydantic.ValidationError as envelope_error:
            return _not_valid(channel, known, bare, message, envelope_error)
        return Delivery(message, env["data"], env["id"], env["ts"], env.get("headers", NO_HEADERS))

    return decode


def _not_valid(
    channel: str,
    known: set[str],
    bare: Callable[[str], Event] | None,
    message: Message,
    envelope_error: pydantic.ValidationError,
) -> Delivery:
    """Not a valid envelope of a known type: another type's, a bare object, or an error."""
    payload = message.payload
    try:
        obj = pydantic_core.from_json(payload)
    except ValueError as exc:  # not JSON, or nested deeper than pydantic reads
        raise DecodeError(channel, payload, f"payload: not JSON: {exc}") from exc
    if is_envelope(obj):
        refused = _refusal(obj)
        if refused is not None:
            raise DecodeError(channel, payload, refused) from envelope_error
        if obj["type"] in known:
            raise DecodeError(channel, payload, _reason(envelope_error)) from envelope_error
        return _other_type(channel, message)
    if bare is None:
        reason = "a bare object on a channel of several event types: publish an envelope"
        raise DecodeError(channel, payload, reason)
    try:
        return Delivery(message, bare(payload))
    except pydantic.ValidationError as bare_error:
        raise DecodeError(channel, payload, _reason(bare_error)) from bare_error


_validate_any: Callable[[str], dict[str, Any]] = pydantic.TypeAdapter(
    envelope_type(None)
).validate_json


def _other_type(channel: str, message: Message) -> Delivery:
    """The delivery, without an event, of an envelope of a type no model here has."""
    try:
        env = _validate_any(message.payload)
    except pydantic.ValidationError as error:
        raise DecodeError(channel, message.payload, _reason(error)) from error
    return Delivery(message, None, env["id"], env["ts"], env.get("headers", NO_HEADERS))


def _refusal(envelope: dict[str, Any]) -> str | None:
    """Why ``envelope`` is refused before its fields are looked at, in words a publisher reads."""
    version = envelope["v"]
    if type(version) is not int or version != ENVELOPE_VERSION:
        return (
            f"v: envelope version {json.dumps(version)} is not supported"
            f" (this reader knows version {ENVELOPE_VERSION})"
        )
    ts = envelope.get("ts")
    if isinstance(ts, str):
        return "ts: must be a JSON number of seconds since the epoch, not a string"
    if isinstance(ts, int | float) and not isinstance(ts, bool) and ts >= TS_LIMIT:
        return f"ts: {ts} looks like milliseconds; it must be seconds since the epoch"
    return None


def _reason(error: pydantic.ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
