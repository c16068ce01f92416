"""A third-party plugin: a fixed reconnect interval (the seed's SetReconnectInterval).

It records every call so that the test suite can see it was loaded from its entry point
and that it replaced the built-in backoff.
"""

from __future__ import annotations

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
