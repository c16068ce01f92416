"""The built-in plugins: ordinary plugins that use only the public :data:`pgbus.hookimpl`.

Each is registered under its name and can be blocked by it (``Bus(disable_plugins=[…])``
or ``PGBUS_DISABLE_PLUGINS``) or replaced by registering a plugin that implements the
same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgbus.default_plugins import backoff, codec, metrics, routing

if TYPE_CHECKING:
    from collections.abc import Callable

#: ``(name, factory)`` for every built-in plugin, in registration order. A factory is
#: called once per Bus, so plugins with state (metrics) are not shared between buses.
DEFAULT_PLUGINS: tuple[tuple[str, Callable[[], object]], ...] = (
    ("codec", lambda: codec),
    ("routing", lambda: routing),
    ("backoff", backoff.ExponentialBackoff),
    ("metrics", metrics.Metrics),
)
