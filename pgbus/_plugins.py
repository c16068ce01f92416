"""The per-Bus plugin manager: built-ins, user plugins and the ``pgbus`` entry points."""

from __future__ import annotations

import inspect
import logging
import os
from typing import TYPE_CHECKING, Any, Literal

import pluggy

from pgbus import hookspecs
from pgbus.errors import PluginError

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: The entry-point group third-party plugins register in.
ENTRYPOINT_GROUP = "pgbus"

Origin = Literal["built-in", "entry point", "code"]


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


class PluginManager:
    """A typed facade over one :class:`pluggy.PluginManager`, owned by one Bus.

    :param plugins: plugin objects to register after the built-ins.
    :param load_entrypoints: load plugins from the ``pgbus`` entry-point group (also
        turned off by ``PGBUS_DISABLE_PLUGIN_AUTOLOAD=1``).
    :param disable_plugins: names of plugins (built-in or entry point) not to register;
        ``PGBUS_DISABLE_PLUGINS`` (comma-separated) adds to it.
    """

    def __init__(
        self,
        plugins: Iterable[object] = (),
        *,
        load_entrypoints: bool = True,
        disable_plugins: Iterable[str] = (),
    ) -> None:
        self.pm = pluggy.PluginManager("pgbus")
        self.pm.add_hookspecs(hookspecs)
        self.hook = self.pm.hook
        self._origins: dict[str, Origin] = {}
        from pgbus.default_plugins import DEFAULT_PLUGINS  # noqa: PLC0415 - they import pgbus

        blocked = set(disable_plugins) | _env_list("PGBUS_DISABLE_PLUGINS")
        for name in blocked:
            self.pm.set_blocked(name)
        for name, factory in DEFAULT_PLUGINS:
            if name not in blocked:
                self.register(factory(), name=name, origin="built-in")
        autoload_off = os.environ.get("PGBUS_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
        if load_entrypoints and not autoload_off:
            self._load_entrypoints()
        for plugin in plugins:
            self.register(plugin, origin="code")

    def _load_entrypoints(self) -> None:
        before = set(self.pm.get_plugins())
        self.pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP)
        for plugin in set(self.pm.get_plugins()) - before:
            name = self.pm.get_name(plugin)
            if name is not None:
                self._check(plugin, name)
                self._origins[name] = "entry point"
                logger.info("loaded plugin %s from entry point group %r", name, ENTRYPOINT_GROUP)

    def register(self, plugin: object, name: str | None = None, *, origin: Origin = "code") -> str:
        """Register ``plugin`` and return its name.

        :raises PluginError: when it implements an unknown ``pgbus_`` hook, or a
            ``firstresult`` hook with ``async def``.
        """
        try:
            registered = self.pm.register(plugin, name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(str(exc)) from exc
        if registered is None:  # blocked by name
            return name or ""
        self._check(plugin, registered)
        self._origins[registered] = origin
        return registered

    def _check(self, plugin: object, name: str) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        for caller in self.pm.get_hookcallers(plugin) or ():
            if caller.spec is None or not caller.spec.opts.get("firstresult"):
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and inspect.iscoroutinefunction(impl.function):
                    self.pm.unregister(plugin)
                    raise PluginError(
                        f"plugin {name!r}: {caller.name} is a firstresult hook and must not"
                        " be async def"
                    )

    def unregister(self, name: str) -> object:
        """Unregister the plugin called ``name`` and return it.

        :raises PluginError: when no plugin has that name.
        """
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            raise PluginError(f"no plugin named {name!r}")
        self.pm.unregister(plugin)
        self._origins.pop(name, None)
        return plugin

    def get(self, name: str) -> Any:
        """Return the plugin registered as ``name``, or ``None``."""
        return self.pm.get_plugin(name)

    def list(self) -> list[tuple[str, object, Origin, list[str]]]:
        """Every registered plugin: ``(name, plugin, origin, hook names)``, in call order."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # a blocked name
                continue
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or ())
            rows.append((name, plugin, self._origins.get(name, "code"), hooks))
        return rows

    def has_impls(self, hook_name: str) -> bool:
        """Whether any registered plugin implements the hook ``hook_name``."""
        caller: pluggy.HookCaller = getattr(self.hook, hook_name)
        return bool(caller.get_hookimpls())
