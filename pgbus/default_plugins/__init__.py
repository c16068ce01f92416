"""The built-in plugins: ordinary plugins, each registered under its name.

Each can be blocked by name (``Bus(disable_plugins=[…])`` or ``PGBUS_DISABLE_PLUGINS``)
or replaced by registering a plugin that implements the same hooks.

A handler call goes through ``retry`` (``tryfirst``: always outermost) → other
middleware, last-registered outermost (``metrics``, your plugins) → ``timeouts``
(``trylast``) → ``reply`` (``trylast`` too, registered after it: innermost, so it sees
the handler's return value) → the handler. So every attempt is counted and bounded by
the timeout, and a timed-out attempt can be retried, even when one of them is replaced.

This module is the one registry of built-ins by name: it names modules and never
imports them, so the core (which reads the registry) never imports a plugin. A module is
imported when a Bus registers it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def _module(name: str) -> Callable[[], object]:
    """A factory returning the module ``name`` itself (a stateless plugin)."""

    def load() -> object:
        return importlib.import_module(f"{__name__}.{name}")

    return load


def _instance(name: str, attr: str, package: str = __name__) -> Callable[[], object]:
    """A factory returning a new instance of class ``attr`` of module ``package.name``."""

    def make() -> object:
        cls: Callable[[], object] = getattr(importlib.import_module(f"{package}.{name}"), attr)
        return cls()

    return make


#: ``(name, factory)`` for every built-in plugin, in registration order. A factory is
#: called once per Bus, so plugins with state (metrics) are not shared between buses.
DEFAULT_PLUGINS: tuple[tuple[str, Callable[[], object]], ...] = (
    ("codec", _module("codec")),
    ("routing", _module("routing")),
    ("backoff", _instance("backoff", "ExponentialBackoff")),
    ("timeouts", _instance("timeouts", "Timeouts")),
    ("reply", _instance("reply", "Replies")),  # after timeouts: innermost of the trylast
    ("metrics", _instance("metrics", "Metrics")),
    ("dead_letters", _instance("dead_letters", "DeadLetters")),
    ("retry", _instance("retry", "RetryPlugin")),
)

#: ``(name, factory)`` of the built-ins a Bus registers only when asked
#: (:meth:`PluginManager.enable <pgbus._plugins.PluginManager.enable>`): ``Bus(durable=True)``.
OPTIONAL_PLUGINS: tuple[tuple[str, Callable[[], object]], ...] = (
    ("durable", _instance("durable", "DurablePlugin", package="pgbus")),
)

#: What a ``memory://`` bus registers instead, under the same names: the same hooks and
#: behaviour with the state kept in the process (``Bus("memory://x", durable=True)``).
MEMORY_PLUGINS: tuple[tuple[str, Callable[[], object]], ...] = (
    ("durable", _instance("durable", "MemoryDurablePlugin", package="pgbus")),
)
