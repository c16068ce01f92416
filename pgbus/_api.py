"""Module-level helpers on a default bus: ``pgbus.configure()`` then ``pgbus.publish()``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgbus._bus import Bus
from pgbus._status import BusState
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from pgbus._drivers import AsyncConnection
    from pgbus._events import Event

_default: Bus | None = None


def configure(dsn: str | None = None, **options: Any) -> Bus:
    """Create the default bus used by :func:`publish`, :func:`publish_many` and :func:`notify`.

    Without a ``dsn``, the bus finds its database on first use: ``$PGBUS_DSN``, else
    libpq's environment (see :attr:`Bus.dsn`). Calling it again replaces the default bus
    (close the old one with :func:`close` first if it published).

    :param dsn: the database.
    :param options: keyword arguments for :class:`Bus`.
    :returns: the new default bus.

    .. versionadded:: 0.1.0
    """
    global _default  # noqa: PLW0603 - the module-level default is the point
    _default = Bus(dsn, **options)
    return _default


def get_bus() -> Bus:
    """Return the default bus, creating it on first use (from ``$PGBUS_DSN`` or libpq's env).

    :raises ConfigError: when no database is named (no :func:`configure` DSN, no
        ``PGBUS_DSN``, no libpq environment).

    .. versionadded:: 0.1.0
    """
    bus = _default
    if bus is None or bus.state in (BusState.STOPPING, BusState.STOPPED):
        bus = configure()
    try:
        bus.dsn  # noqa: B018 - resolved now, so that a missing database is named here
    except ConfigError as exc:
        raise ConfigError(f"no default bus: call pgbus.configure(dsn); {exc}") from None
    return bus


async def publish(
    event: Event,
    *,
    connection: AsyncConnection | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Publish ``event`` through the default bus (see :meth:`Bus.publish`).

    .. versionadded:: 0.1.0
    """
    return await get_bus().publish(event, connection=connection, headers=headers)


async def publish_many(
    events: Iterable[Event], *, connection: AsyncConnection | None = None
) -> list[str]:
    """Publish events in one statement through the default bus (see :meth:`Bus.publish_many`).

    .. versionadded:: 0.1.0
    """
    return await get_bus().publish_many(events, connection=connection)


async def notify(
    channel: str, payload: str = "", *, connection: AsyncConnection | None = None
) -> None:
    """Send a plain NOTIFY through the default bus (see :meth:`Bus.notify`).

    .. versionadded:: 0.1.0
    """
    await get_bus().notify(channel, payload, connection=connection)


async def close() -> None:
    """Stop the default bus and close its connections (harmless when there is none).

    .. versionadded:: 0.1.0
    """
    global _default
    bus, _default = _default, None
    if bus is not None:
        await bus.stop()
