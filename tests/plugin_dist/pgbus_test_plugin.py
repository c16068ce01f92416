"""A third-party plugin: a fixed reconnect interval (the seed's SetReconnectInterval).

It records every call so that the test suite can see it was loaded from its entry point
and that it replaced the built-in backoff. It also adds ``pgbus hello`` (the
``pgbus.commands`` entry-point group).
"""

from __future__ import annotations

import click

import pgbus

#: Seconds between reconnect attempts.
INTERVAL = 0.05

#: ``(hook name, argument)`` for every call, in order.
CALLS: list[tuple[str, object]] = []


@pgbus.hookimpl
def pgbus_reconnect_backoff(attempt: int, error: BaseException | None) -> float:
    """Wait a fixed interval before every attempt."""
    CALLS.append(("pgbus_reconnect_backoff", attempt))
    return INTERVAL


@pgbus.hookimpl
def pgbus_configure(bus: pgbus.Bus) -> None:
    """Record the bus this plugin was loaded into."""
    CALLS.append(("pgbus_configure", bus))


@click.command()
@click.pass_context
def hello(ctx: click.Context) -> None:
    """Say hello to the database the pgbus group was given."""
    click.echo(f"hello {ctx.obj.require_dsn()} within {ctx.obj.timeout}s")
