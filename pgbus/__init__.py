"""pgbus: a typed, plugin-based event bus on PostgreSQL LISTEN/NOTIFY for asyncio.

Publish pydantic models in one process; receive them validated in the handlers of every
subscribed process::

    class OrderPlaced(pgbus.Event, channel="orders"):
        order_id: int

    bus = pgbus.Bus("postgresql://localhost/app")

    @bus.subscribe(OrderPlaced)
    async def on_order(event: OrderPlaced) -> None: ...

    async with bus:
        await bus.publish(OrderPlaced(order_id=1))

Writing a plugin
----------------
A plugin is a module or object whose functions are named after the hooks in
:mod:`pgbus.hookspecs` and marked with :data:`hookimpl`. Pass it to
``Bus(plugins=[...])``, or ship it as a distribution that registers it in the ``pgbus``
entry-point group, and every Bus loads it::

    [project.entry-points.pgbus]
    my_plugin = "my_package.my_plugin"

``Bus(load_entrypoints=False)`` or ``PGBUS_DISABLE_PLUGIN_AUTOLOAD=1`` turn loading off;
``Bus(disable_plugins=["name"])`` or ``PGBUS_DISABLE_PLUGINS=name,...`` block plugins by
name, built-ins included.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from pgbus import durable  # noqa: F401 - `pgbus.durable` after `import pgbus`
    from pgbus._api import close, configure, get_bus, notify, publish, publish_many
    from pgbus._bus import Bus
    from pgbus._config import resolve_dsn
    from pgbus._context import Context
    from pgbus._events import Batch, DeadLetter, Delivery, Event, Message, Outgoing
    from pgbus._markers import hookimpl
    from pgbus._metrics_publisher import MetricsPublisher
    from pgbus._status import BusState, BusStatus, Gap, ListenerState
    from pgbus._subscription import Overflow, Retry, Subscription
    from pgbus._version import __version__
    from pgbus.changes import ChangeTrigger, RowChanged
    from pgbus.default_plugins.backoff import ExponentialBackoff
    from pgbus.default_plugins.metrics import (
        ChannelStats,
        HistogramSnapshot,
        MetricsSnapshot,
        SubscriptionStats,
    )
    from pgbus.errors import (
        AlreadyStarted,
        BusClosed,
        ClusterError,
        ConfigError,
        DecodeError,
        DuplicateEventId,
        InvalidChannel,
        InvalidIdentifier,
        ListenerError,
        Nack,
        PayloadTooLarge,
        PgbusError,
        PluginError,
        PublishError,
        Reject,
        RequestFailed,
        RequestTimeout,
        ServerNotFound,
    )

#: Where each public name lives: imported on first use, so that ``import pgbus`` (and
#: ``pgbus --help``) does not pay for asyncpg and pydantic until they are needed.
_LAZY = {
    "AlreadyStarted": "pgbus.errors",
    "Batch": "pgbus._events",
    "Bus": "pgbus._bus",
    "BusClosed": "pgbus.errors",
    "BusState": "pgbus._status",
    "BusStatus": "pgbus._status",
    "ChangeTrigger": "pgbus.changes",
    "ChannelStats": "pgbus.default_plugins.metrics",
    "ClusterError": "pgbus.errors",
    "ConfigError": "pgbus.errors",
    "Context": "pgbus._context",
    "DeadLetter": "pgbus._events",
    "DecodeError": "pgbus.errors",
    "Delivery": "pgbus._events",
    "DuplicateEventId": "pgbus.errors",
    "Event": "pgbus._events",
    "ExponentialBackoff": "pgbus.default_plugins.backoff",
    "Gap": "pgbus._status",
    "HistogramSnapshot": "pgbus.default_plugins.metrics",
    "InvalidChannel": "pgbus.errors",
    "InvalidIdentifier": "pgbus.errors",
    "ListenerError": "pgbus.errors",
    "ListenerState": "pgbus._status",
    "Message": "pgbus._events",
    "Nack": "pgbus.errors",
    "MetricsPublisher": "pgbus._metrics_publisher",
    "MetricsSnapshot": "pgbus.default_plugins.metrics",
    "Outgoing": "pgbus._events",
    "Overflow": "pgbus._subscription",
    "PayloadTooLarge": "pgbus.errors",
    "PgbusError": "pgbus.errors",
    "PluginError": "pgbus.errors",
    "PublishError": "pgbus.errors",
    "Reject": "pgbus.errors",
    "RequestFailed": "pgbus.errors",
    "RequestTimeout": "pgbus.errors",
    "Retry": "pgbus._subscription",
    "RowChanged": "pgbus.changes",
    "ServerNotFound": "pgbus.errors",
    "Subscription": "pgbus._subscription",
    "SubscriptionStats": "pgbus.default_plugins.metrics",
    "__version__": "pgbus._version",
    "close": "pgbus._api",
    "configure": "pgbus._api",
    "get_bus": "pgbus._api",
    "hookimpl": "pgbus._markers",
    "notify": "pgbus._api",
    "publish": "pgbus._api",
    "publish_many": "pgbus._api",
    "resolve_dsn": "pgbus._config",
}

__all__ = [
    "AlreadyStarted",
    "Batch",
    "Bus",
    "BusClosed",
    "BusState",
    "BusStatus",
    "ChangeTrigger",
    "ChannelStats",
    "ClusterError",
    "ConfigError",
    "Context",
    "DeadLetter",
    "DecodeError",
    "Delivery",
    "DuplicateEventId",
    "Event",
    "ExponentialBackoff",
    "Gap",
    "HistogramSnapshot",
    "InvalidChannel",
    "InvalidIdentifier",
    "ListenerError",
    "ListenerState",
    "Message",
    "MetricsPublisher",
    "MetricsSnapshot",
    "Nack",
    "Outgoing",
    "Overflow",
    "PayloadTooLarge",
    "PgbusError",
    "PluginError",
    "PublishError",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Retry",
    "RowChanged",
    "ServerNotFound",
    "Subscription",
    "SubscriptionStats",
    "__version__",
    "close",
    "configure",
    "get_bus",
    "hookimpl",
    "notify",
    "publish",
    "publish_many",
    "resolve_dsn",
]


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule: `pgbus.durable.DurablePlugin` after `import pgbus`
        try:
            return _importlib.import_module(f"pgbus.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pgbus.{name}":
                raise
            raise AttributeError(f"module 'pgbus' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "durable", "sync"})
