"""The data commands of ``pgbus``: ``listen``, ``publish``, ``plugins``."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from typing import TYPE_CHECKING, Any

import click
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

from pgbus._bus import Bus
from pgbus._channels import check_channel
from pgbus._markers import hookimpl
from pgbus._plugins import PluginManager
from pgbus.cli._common import (
    CliError,
    State,
    dumps,
    import_module,
    interrupted,
    load_model,
    run,
    stderr,
    stdout,
)
from pgbus.cli._main import CONTEXT_SETTINGS
from pgbus.errors import InvalidChannel

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._events import Delivery, Event, Message
    from pgbus._subscription import Subscription
    from pgbus.types import Outgoing


def _channels(values: Sequence[str]) -> list[str]:
    try:
        return [check_channel(value) for value in values]
    except InvalidChannel as exc:
        raise CliError(str(exc)) from exc


def _bus(state: State, **kwargs: Any) -> Bus:
    return Bus(
        state.require_dsn(),
        start_timeout=state.timeout,
        connect_timeout=state.timeout,
        **kwargs,
    )


# -- listen ------------------------------------------------------------------------------


class _Tap:
    """A plugin that hands every handled delivery and decode failure to the printer."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Delivery | Message, BaseException | None]] = asyncio.Queue()

    @hookimpl
    def pgbus_on_handled(
        self,
        subscription: Subscription,  # noqa: ARG002 - part of the hook's signature
        delivery: Delivery,
        duration: float,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        self.queue.put_nowait((delivery, None))

    @hookimpl
    def pgbus_on_decode_error(self, message: Message, error: BaseException) -> None:
        self.queue.put_nowait((message, error))


async def _ignore(_: object) -> None:
    """The handler of ``pgbus listen``'s subscriptions: the tap does the printing."""


def _clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).astimezone().strftime("%H:%M:%S.%f")[:-3]


def _record(item: Delivery | Message, error: BaseException | None) -> dict[str, Any]:
    if error is not None:
        message: Message = item  # type: ignore[assignment]
        return {
            "channel": message.channel,
            "pid": message.pid,
            "received_at": message.received_at,
            "error": str(getattr(error, "reason", error)),
            "payload": message.payload,
        }
    delivery: Delivery = item  # type: ignore[assignment]
    record: dict[str, Any] = {
        "channel": delivery.channel,
        "pid": delivery.message.pid,
        "received_at": delivery.message.received_at,
    }
    if delivery.event is None:
        record["payload"] = delivery.message.payload
        return record
    record.update(
        type=type(delivery.event).pgbus_type,
        id=delivery.id,
        published_at=delivery.published_at,
        headers=dict(delivery.headers),
        event=delivery.event.model_dump(mode="json"),
    )
    return record


def _pretty(record: dict[str, Any]) -> Text:
    highlight = JSONHighlighter()
    line = Text.assemble(
        (_clock(record["received_at"]), "dim"), " ", (record["channel"], "bold cyan"), " "
    )
    if "error" in record:
        line.append(f"invalid: {record['error']} ", style="bold red")
        line.append(record["payload"], style="dim")
    elif "event" in record:
        line.append(record["type"], style="bold green")
        line.append(f" {record['id'][:8]} " if record["id"] else " ", style="dim")
        line.append_text(highlight(Text(dumps(record["event"]))))
    else:
        line.append_text(highlight(Text(record["payload"])))
    return line


async def _listen(
    state: State,
    channels: list[str],
    models: list[type[Event]],
    *,
    as_json: bool,
    count: int | None,
    duration: float | None,
) -> None:
    tap = _Tap()
    bus = _bus(state, plugins=[tap])
    typed_channels = {model.pgbus_channel for model in models}
    for channel in dict.fromkeys(channels):
        if channel not in typed_channels:
            bus.subscribe(channel, name=f"pgbus-listen:{channel}")(_ignore)
    if models:
        bus.subscribe(*models, name="pgbus-listen:models")(_ignore)
    out, err = stdout(), stderr()
    loop = asyncio.get_running_loop()
    async with bus:
        err.print(f"listening on {', '.join(bus.channels)} (Ctrl-C to stop)", style="dim")
        deadline = None if duration is None else loop.time() + duration
        seen = 0
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - loop.time()
            try:
                item, error = await asyncio.wait_for(tap.queue.get(), remaining)
            except TimeoutError:
                break
            record = _record(item, error)
            if as_json:
                sys.stdout.write(dumps(record) + "\n")
                sys.stdout.flush()
            else:
                out.print(_pretty(record))
            seen += 1
    if count is not None and seen < count:
        raise click.ClickException(
            f"timed out after {duration:g} s with {seen} of {count} notifications"
        )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("channels", nargs=-1, metavar="[CHANNEL]...")
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    metavar="MODULE:CLASS",
    help="Decode and validate with this pgbus.Event (its channel is listened to). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "-n", "--count", type=click.IntRange(min=1), help="Exit after this many notifications."
)
@click.option(
    "--for",
    "timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Exit after this long (an error if --count was not reached).",
)
@click.pass_obj
def listen(
    state: State,
    channels: tuple[str, ...],
    models: tuple[str, ...],
    as_json: bool,
    count: int | None,
    timeout: float | None,
) -> None:
    """Print notifications on CHANNELs as they arrive.

    Raw payloads are shown as they are; with --model, events are decoded and validated,
    and payloads the model rejects are shown as invalid.

    \b
      pgbus listen orders audit
      pgbus listen --model app.events:OrderPlaced --json | jq .event
    """
    if not channels and not models:
        raise click.UsageError("give at least one CHANNEL or --model")
    checked = _channels(channels)
    event_types = [load_model(path) for path in models]
    with interrupted():
        run(_listen(state, checked, event_types, as_json=as_json, count=count, duration=timeout))


# -- publish -----------------------------------------------------------------------------


class _Sent:
    """A plugin that keeps what a publish sent (for the size in the report)."""

    def __init__(self) -> None:
        self.outgoing: list[Outgoing] = []

    @hookimpl
    def pgbus_on_published(self, outgoing: Sequence[Outgoing]) -> None:
        self.outgoing.extend(outgoing)


async def _publish(
    state: State,
    channel: str,
    payload: str,
    model: type[Event] | None,
    headers: dict[str, str],
) -> dict[str, Any]:
    sent = _Sent()
    bus = _bus(state, plugins=[sent])
    try:
        if model is None:
            await bus.notify(channel, payload)
            event_id, event_type = None, None
        else:
            event = model.model_validate_json(payload)
            event_id = await bus.publish(event, headers=headers)
            event_type = model.pgbus_type
    finally:
        await bus.stop()
    size = sum(len(out.payload.encode()) for out in sent.outgoing)
    return {"channel": channel, "type": event_type, "id": event_id, "bytes": size}


def _header(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    headers = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        headers[key] = item
    return headers


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("channel")
@click.argument("payload", required=False, metavar="[PAYLOAD|-]")
@click.option(
    "-m",
    "--model",
    metavar="MODULE:CLASS",
    help="Validate PAYLOAD (JSON) as this pgbus.Event and publish it in an envelope.",
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_header,
    help="A header for the envelope (with --model). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def publish(
    state: State,
    channel: str,
    payload: str | None,
    model: str | None,
    headers: dict[str, str],
    as_json: bool,
) -> None:
    """Publish PAYLOAD on CHANNEL (read it from stdin with -).

    Without --model the payload is sent as it is (a plain NOTIFY); with --model it is
    validated as that event type and sent as a pgbus envelope, like Bus.publish() does.

    \b
      pgbus publish audit 'user 7 logged in'
      echo '{"order_id": 1}' | pgbus publish orders - --model app.events:OrderPlaced
    """
    (checked,) = _channels([channel])
    event_type = load_model(model) if model else None
    if event_type is not None and event_type.pgbus_channel != checked:
        raise CliError(f"{model} is published on {event_type.pgbus_channel!r}, not {checked!r}")
    if headers and event_type is None:
        raise click.UsageError("--header needs --model (raw payloads have no envelope)")
    if payload == "-":
        payload = sys.stdin.read()
        if event_type is None:
            payload = payload.removesuffix("\n")
    if payload is None:
        if event_type is not None:
            raise click.UsageError("give the event as JSON (or - to read it from stdin)")
        raise click.UsageError("give a PAYLOAD (- reads it from stdin, '' sends an empty one)")
    result = run(_publish(state, checked, payload, event_type, headers))
    if as_json:
        click.echo(dumps(result))
        return
    what = f"{result['type']} {result['id']}" if result["id"] else "payload"
    stdout().print(f"published {what} on {checked} ({result['bytes']} bytes)")


# -- plugins -----------------------------------------------------------------------------


def _load_plugin(path: str) -> object:
    module_name, _, attr = path.partition(":")
    obj: Any = import_module(module_name)
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-p",
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE[:ATTR]",
    help="Also register this plugin, as code would with Bus(plugins=[...]). Repeatable.",
)
@click.option(
    "--no-entrypoints", is_flag=True, help="Do not load plugins of the 'pgbus' entry-point group."
)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def plugins(plugins: tuple[str, ...], no_entrypoints: bool, as_json: bool) -> None:
    """List every plugin a Bus would register, where it comes from, and its hooks.

    Sources: "built-in" (pgbus.default_plugins), "entry point" (an installed
    distribution's [project.entry-points.pgbus]) and "code" (Bus(plugins=[...])).
    PGBUS_DISABLE_PLUGINS and PGBUS_DISABLE_PLUGIN_AUTOLOAD are honoured.
    """
    manager = PluginManager(load_entrypoints=not no_entrypoints)
    for path in plugins:  # named by the path the user gave, not by pluggy's id() number
        manager.register(_load_plugin(path), name=path)
    dists = {id(plugin): dist for plugin, dist in manager.pm.list_plugin_distinfo()}
    rows: list[dict[str, Any]] = []
    for name, plugin, origin, hooks in manager.list():
        dist = dists.get(id(plugin))
        rows.append(
            {
                "name": name,
                "source": origin,
                "distribution": f"{dist.project_name} {dist.version}" if dist else None,
                "object": getattr(plugin, "__name__", None) or type(plugin).__qualname__,
                "hooks": hooks,
            }
        )
    for row in rows:
        if row["name"] in plugins and not row["hooks"]:
            stderr().print(
                f"warning: {row['name']} implements no pgbus_* hook: nothing will call it",
                style="yellow",
            )
    if as_json:
        click.echo(dumps(rows))
        return
    table = Table(title="pgbus plugins", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("source")
    table.add_column("hooks")
    for row in rows:
        source = row["source"] + (f" ({row['distribution']})" if row["distribution"] else "")
        table.add_row(row["name"], source, ", ".join(row["hooks"]))
    stdout().print(table)
