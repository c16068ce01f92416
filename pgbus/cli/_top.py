"""``pgbus top``: live rates, lag and errors of running buses that publish their metrics.

A bus opts in with ``Bus(plugins=[pgbus.MetricsPublisher()])``; it then NOTIFYs a
snapshot on ``pgbus.metrics`` every second, which this command LISTENs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgbus._metrics_publisher import METRICS_CHANNEL
from pgbus._util import plural
from pgbus.cli._app import _bus, _channels
from pgbus.cli._common import State, dumps, interrupted, run, stderr, stdout
from pgbus.cli._main import CONTEXT_SETTINGS

if TYPE_CHECKING:
    from pgbus._events import Message

#: A bus not heard from for this many of its intervals is dropped from the table.
STALE_INTERVALS = 5

_COUNTERS = ("published", "received", "handled", "failed", "decode_failures")
#: Seconds a snapshot's ``ts`` may lie ahead of this clock (another machine's).
MAX_SKEW = 60.0
#: The longest publishing interval a snapshot may give (a bus then stays listed for
#: :data:`STALE_INTERVALS` of them after it stopped).
MAX_INTERVAL = 3600.0
#: The figures of a snapshot that are ``null`` when nothing was measured.
_NULLABLE = frozenset({"lag_avg", "lag_max"})


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_snapshot(payload: str, now: float | None = None) -> dict[str, Any] | None:
    """The metrics snapshot in ``payload``, or ``None`` when it is not a sane one.

    Any role that can NOTIFY can write to the metrics channel: a snapshot is taken only
    with a string ``bus``, a boolean ``connected``, a finite ``ts`` no more than
    :data:`MAX_SKEW` seconds ahead of ``now``, a finite ``reconnects``, an ``interval`` (if
    any) above 0 and up to :data:`MAX_INTERVAL`, and ``channels`` and ``subscriptions``
    that map names to finite numbers (``null`` only for the lags), so no payload can stall
    or break a reader, or stay listed for long.
    """
    try:
        snapshot = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(snapshot, dict)
        and isinstance(snapshot.get("bus"), str)
        and isinstance(snapshot.get("connected"), bool)
        and _number(snapshot.get("ts"))
        and _number(snapshot.get("reconnects"))
        and _number(snapshot.get("interval", 1.0))
        and 0 < snapshot.get("interval", 1.0) <= MAX_INTERVAL
        and snapshot["ts"] <= (time.time() if now is None else now) + MAX_SKEW
    ):
        return None
    for part in ("channels", "subscriptions"):
        entries = snapshot.get(part)
        if not isinstance(entries, dict) or not all(
            isinstance(stats, dict)
            and all(_number(v) or (v is None and k in _NULLABLE) for k, v in stats.items())
            for stats in entries.values()
        ):
            return None
    return snapshot


class Board:
    """The latest snapshot of every bus, and rates from the one before."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.previous: dict[str, dict[str, Any]] = {}

    def add(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Take in one snapshot; return it with ``rates`` (per second) per channel."""
        bus = str(snapshot.get("bus"))
        before = self.latest.get(bus)
        if before is not None:
            self.previous[bus] = before
        elapsed = (snapshot["ts"] - before["ts"]) if before else 0.0
        rates: dict[str, dict[str, float | None]] = {}
        for channel, now in snapshot.get("channels", {}).items():
            then = before["channels"].get(channel, {}) if before else None
            rates[channel] = {
                key: (now.get(key, 0) - then.get(key, 0)) / elapsed
                if then is not None and elapsed > 0
                else None
                for key in _COUNTERS
            }
        snapshot["rates"] = rates
        self.latest[bus] = snapshot
        return snapshot

    def prune(self, now: float) -> None:
        """Forget buses that stopped publishing."""
        for bus, snap in list(self.latest.items()):
            if now - snap["ts"] > STALE_INTERVALS * float(snap.get("interval", 1.0)):
                del self.latest[bus]
                self.previous.pop(bus, None)

    def table(self) -> Table:
        """The table to show: one row per bus and channel."""
        table = Table(
            title=f"pgbus top: {plural(len(self.latest), 'bus', 'buses')}", title_justify="left"
        )
        for name, justify in (
            ("bus", "left"),
            ("channel", "left"),
            ("pub/s", "right"),
            ("recv/s", "right"),
            ("handled/s", "right"),
            ("errors", "right"),
            ("nacks", "right"),
            ("rejects", "right"),
            ("delayed", "right"),
            ("scheduled", "right"),
            ("lag avg", "right"),
            ("lag max", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for bus, snap in sorted(self.latest.items()):
            state = "" if snap.get("connected", True) else " (reconnecting)"
            label = Text(bus + state, style="bold" if not state else "bold yellow")
            channels = snap.get("channels", {}) or {"-": {}}
            scheduled = snap.get("scheduled")  # the bus's: shown on its first row
            for channel, stats in sorted(channels.items()):
                rate = snap.get("rates", {}).get(channel, {})
                errors = stats.get("failed", 0) + stats.get("decode_failures", 0)
                table.add_row(
                    label,
                    channel,
                    _rate(rate.get("published")),
                    _rate(rate.get("received")),
                    _rate(rate.get("handled")),
                    Text(str(errors), style="red" if errors else ""),
                    str(stats.get("nacked", 0)),
                    Text(str(rejects := stats.get("rejected", 0)), style="red" if rejects else ""),
                    str(stats.get("delayed", 0)),
                    "-" if scheduled is None else str(scheduled),
                    _ms(stats.get("lag_avg")),
                    _ms(stats.get("lag_max")),
                )
                label = Text("")
                scheduled = None
        if not self.latest:
            table.caption = (
                f"waiting for snapshots on {METRICS_CHANNEL!r}: run your bus with"
                " plugins=[pgbus.MetricsPublisher()]"
            )
        return table


def _rate(value: float | None) -> str:
    return "…" if value is None else f"{value:,.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.1f} ms"


async def _top(  # noqa: C901 - one loop: read, add, prune, redraw, stop
    state: State, channel: str, *, as_json: bool, once: bool, duration: float | None
) -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_snapshot(message: Message) -> None:
        snapshot = parse_snapshot(message.payload)
        if snapshot is not None:
            queue.put_nowait(snapshot)

    bus = _bus(state)
    bus.subscribe(channel, name="pgbus-top")(on_snapshot)
    board = Board()
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    async with bus:
        stderr().print(f"listening on {channel!r} (Ctrl-C to stop)", style="dim")
        live = None if as_json or once else Live(board.table(), console=stdout(), transient=False)
        with live if live is not None else contextlib.nullcontext():
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                wait = 1.0 if remaining is None else max(0.0, min(1.0, remaining))
                try:
                    snapshot = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    snapshot = None
                if snapshot is not None:
                    board.add(snapshot)
                    if as_json:
                        sys.stdout.write(dumps(snapshot) + "\n")
                        sys.stdout.flush()
                board.prune(max((s["ts"] for s in board.latest.values()), default=0.0))
                if live is not None:
                    live.update(board.table())
                if once and board.previous:
                    break
                if remaining is not None and remaining <= 0:
                    if once:
                        raise click.ClickException(
                            f"no two snapshots on {channel!r} within {duration:g} s; is a bus"
                            " running with plugins=[pgbus.MetricsPublisher()]?"
                        )
                    break
    if once:
        stdout().print(board.table())


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--channel",
    default=METRICS_CHANNEL,
    show_default=True,
    help="The channel the buses publish their metrics on.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each snapshot, with rates, as JSON.")
@click.option("--once", is_flag=True, help="Print one table (after two snapshots) and exit.")
@click.option(
    "--for",
    "timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Exit after this long.",
)
@click.pass_obj
def top(state: State, channel: str, as_json: bool, once: bool, timeout: float | None) -> None:
    """Show live per-channel rates, lag and errors of running buses.

    Buses opt in by registering the metrics publisher, which NOTIFYs a snapshot on
    'pgbus.metrics' every second:

    \b
      bus = pgbus.Bus(dsn, plugins=[pgbus.MetricsPublisher()])

    Lag is the time from publish to the end of handling, over the last interval.
    """
    (checked,) = _channels([channel])
    if once and timeout is None:
        timeout = 10.0
    with interrupted():
        run(_top(state, checked, as_json=as_json, once=once, duration=timeout))
