"""``pgbus schema``: JSON Schema (or AsyncAPI) of event models, for other languages."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import click
from pydantic import TypeAdapter

from pgbus._util import plural
from pgbus._version import __version__
from pgbus.cli._common import load_models, model_path, stderr
from pgbus.default_plugins.codec import ENVELOPE_VERSION, envelope_type

if TYPE_CHECKING:
    from pgbus._events import Event

_ASYNCAPI_KEY = re.compile(r"[^A-Za-z0-9._-]")


def envelope_schema(event_type: type[Event]) -> dict[str, Any]:
    """The JSON Schema of ``event_type`` as it travels: the envelope around the model.

    :param event_type: the model.
    :returns: a self-contained JSON Schema (the model in ``$defs``).
    """
    schema: dict[str, Any] = TypeAdapter(envelope_type(event_type)).json_schema()
    schema["title"] = f"{event_type.pgbus_type} envelope"
    schema["description"] = (
        f"A {event_type.pgbus_type} event as published by pgbus on channel"
        f" {event_type.pgbus_channel!r}: the event is in 'data'; 'id' is unique per event."
    )
    return schema


def by_channel(models: list[type[Event]]) -> dict[str, list[type[Event]]]:
    """Group ``models`` by channel, in order."""
    channels: dict[str, list[type[Event]]] = {}
    for model in models:
        channels.setdefault(model.pgbus_channel or "", []).append(model)
    return channels


def pgbus_document(models: list[type[Event]]) -> dict[str, Any]:
    """The pgbus schema document: every channel, its event types and their schemas."""
    return {
        "pgbus": __version__,
        "envelope_version": ENVELOPE_VERSION,
        "channels": {
            channel: {
                event.pgbus_type: {
                    "python": model_path(event),
                    "data": event.model_json_schema(),
                    "envelope": envelope_schema(event),
                }
                for event in events
            }
            for channel, events in by_channel(models).items()
        },
    }


def _key(text: str) -> str:
    return _ASYNCAPI_KEY.sub("_", text)


def asyncapi_document(models: list[type[Event]], title: str) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: one channel per NOTIFY channel, one message per model."""
    envelopes = [envelope_type(event) for event in models]
    refs, defs = TypeAdapter.json_schemas(
        [(env, "validation", TypeAdapter(env)) for env in envelopes],
        ref_template="#/components/schemas/{model}",
    )
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for event, env in zip(models, envelopes, strict=True):
        channel = event.pgbus_channel or ""
        channel_key = _key(channel)
        message_key = _key(f"{channel}.{event.pgbus_type}")
        messages[message_key] = {
            "name": event.pgbus_type,
            "title": event.pgbus_type,
            "summary": (event.__doc__ or "").strip().split("\n")[0] or None,
            "contentType": "application/json",
            "payload": refs[(env, "validation")],
        }
        entry = channels.setdefault(
            channel_key,
            {
                "address": channel,
                "description": "A PostgreSQL LISTEN/NOTIFY channel.",
                "messages": {},
            },
        )
        entry["messages"][message_key] = {"$ref": f"#/components/messages/{message_key}"}
    for channel_key, entry in channels.items():
        refs_list = [
            {"$ref": f"#/channels/{channel_key}/messages/{key}"} for key in entry["messages"]
        ]
        channel_ref = {"$ref": f"#/channels/{channel_key}"}
        operations[f"publish_{channel_key}"] = {
            "action": "send",
            "channel": channel_ref,
            "messages": refs_list,
        }
        operations[f"receive_{channel_key}"] = {
            "action": "receive",
            "channel": channel_ref,
            "messages": refs_list,
        }
    for message in messages.values():
        if message["summary"] is None:
            del message["summary"]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": __version__,
            "description": "Events published with pgbus over PostgreSQL LISTEN/NOTIFY.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": defs.get("$defs", {})},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("targets", nargs=-1, required=True, metavar="MODULE[:CLASS]...")
@click.option("--asyncapi", is_flag=True, help="Write an AsyncAPI 3.0 document instead.")
@click.option(
    "--title", default="pgbus events", show_default=True, help="The AsyncAPI document's title."
)
@click.option(
    "-o",
    "--output",
    type=click.File("w"),
    default="-",
    help="Write to this file instead of stdout.",
)
def schema(targets: tuple[str, ...], asyncapi: bool, title: str, output: Any) -> None:
    """Print the JSON Schema of event models, grouped by channel.

    A TARGET is a module (every pgbus.Event with a channel defined in it) or one
    MODULE:CLASS. Each event comes with the schema of its data and of the envelope it
    travels in, so that other languages can publish and consume it.

    \b
      pgbus schema app.events > events.schema.json
      pgbus schema app.events --asyncapi --title "Shop events" -o asyncapi.json
    """
    models = load_models(targets)
    document = asyncapi_document(models, title) if asyncapi else pgbus_document(models)
    output.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    if output.name != "<stdout>":
        what = "an AsyncAPI document" if asyncapi else "the JSON Schema"
        stderr().print(f"wrote {what} of {plural(len(models), 'event type')} to {output.name}")
