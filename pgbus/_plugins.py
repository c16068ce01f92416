"""The per-Bus plugin manager: built-ins, user plugins and the ``pgbus`` entry points.

:class:`PluginManager` is a typed facade over one :class:`pluggy.PluginManager` (tox's
``manager.py``): the core calls one method per hook and never names a hook as a string.
Observer hooks are guarded here, in one place: a plugin that raises is logged and
counted (:attr:`PluginManager.failures`), and the other plugins and the data path go on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any, Literal

import pluggy

from pgbus import hookspecs
from pgbus._events import Batch, DeadLetter
from pgbus._util import await_all
from pgbus.default_plugins import DEFAULT_PLUGINS, MEMORY_PLUGINS, OPTIONAL_PLUGINS
from pgbus.errors import PluginError

if TYPE_CHECKING:
    import builtins
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

    from pgbus._events import Decoder, Delivery, Encoder, Event, Message, Outgoing
    from pgbus._subscription import Middleware, Overflow, Router, Subscription
    from pgbus.errors import ListenerError

logger = logging.getLogger(__name__)

#: The entry-point group third-party plugins register in.
ENTRYPOINT_GROUP = "pgbus"

Origin = Literal["built-in", "entry point", "code"]

#: Observer hooks called on the hot path or from timers: ``async def`` is refused.
SYNC_OBSERVERS = frozenset(
    {
        "pgbus_on_published",
        "pgbus_on_received",
        "pgbus_on_handled",
        "pgbus_on_slow_handler",
        "pgbus_on_dropped",
    }
)

#: ``(plugin name, function, argument names)`` of each implementation, in call order.
_Calls = tuple[tuple[str, "Callable[..., Any]", tuple[str, ...]], ...]


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


class _Manager(pluggy.PluginManager):
    """pluggy's manager, telling its facade whenever the registered plugins change."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__("pgbus")
        self._changed = changed

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        # Only pgbus_ names can be hooks: pluggy would otherwise read every attribute of
        # a plugin, properties included (one that raises before configure breaks register).
        if not name.startswith("pgbus_"):
            return None
        return super().parse_hookimpl_opts(plugin, name)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self._changed()

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self._changed()


class PluginManager:
    """A typed facade over one :class:`pluggy.PluginManager`, owned by one Bus.

    :param plugins: plugin objects to register after the built-ins.
    :param load_entrypoints: load plugins from the ``pgbus`` entry-point group (also
        turned off by ``PGBUS_DISABLE_PLUGIN_AUTOLOAD=1``).
    :param disable_plugins: names of plugins (built-in or entry point) not to register;
        ``PGBUS_DISABLE_PLUGINS`` (comma-separated) adds to it.

    :ivar pm: the pluggy manager underneath (register through this facade instead).
    :ivar hook: pluggy's hook relay, for plugins that call a hook of their own.
    :ivar failures: how many times each plugin's observer hook raised, keyed
        ``"hook_name:plugin_name"``.
    """

    def __init__(
        self,
        plugins: Iterable[object] = (),
        *,
        load_entrypoints: bool = True,
        disable_plugins: Iterable[str] = (),
    ) -> None:
        self._calls: dict[str, _Calls | None] = {}
        self.pm = _Manager(self._calls.clear)
        self.pm.add_hookspecs(hookspecs)
        self.hook = self.pm.hook
        self.failures: dict[str, int] = {}
        self._origins: dict[str, Origin] = {}
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

    # -- registry ------------------------------------------------------------------------

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

        :raises PluginError: when it implements an unknown ``pgbus_`` hook, a
            ``firstresult`` hook with ``async def``, or a synchronous observer hook
            (:data:`SYNC_OBSERVERS`) with ``async def``.
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

    def enable(self, name: str, *, memory: bool = False) -> bool:
        """Register the optional built-in plugin ``name`` (``"durable"``) unless one is.

        :param memory: register its in-memory variant (``MEMORY_PLUGINS``), for a
            ``memory://`` bus.
        :returns: whether it was registered now.
        :raises PluginError: when no optional built-in has that name.

        .. versionadded:: 0.2.0
        .. versionchanged:: 0.3.0 ``memory``.
        """
        factories = dict(MEMORY_PLUGINS if memory else OPTIONAL_PLUGINS)
        if name not in factories:
            raise PluginError(f"no optional built-in plugin named {name!r}")
        if self.pm.get_plugin(name) is not None or self.pm.is_blocked(name):
            return False
        self.register(factories[name](), name=name, origin="built-in")
        return True

    def _check(self, plugin: object, name: str) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        for caller in self.pm.get_hookcallers(plugin) or ():
            if caller.spec is None:
                continue
            firstresult = caller.spec.opts.get("firstresult")
            if not firstresult and caller.name not in SYNC_OBSERVERS:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and inspect.iscoroutinefunction(impl.function):
                    self.pm.unregister(plugin)
                    kind = "a firstresult hook" if firstresult else "called synchronously"
                    raise PluginError(
                        f"plugin {name!r}: {caller.name} is {kind} and must not be async def"
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

    # -- factory and strategy hooks (called once per type, channel or subscription) ----

    def encoder(self, event_type: type[Event]) -> Encoder | None:
        """:func:`~pgbus.hookspecs.pgbus_encoder`."""
        found: Encoder | None = self.hook.pgbus_encoder(event_type=event_type)
        return found

    def decoder(self, channel: str, event_types: Sequence[type[Event]]) -> Decoder | None:
        """:func:`~pgbus.hookspecs.pgbus_decoder`."""
        found: Decoder | None = self.hook.pgbus_decoder(channel=channel, event_types=event_types)
        return found

    def router(self, channel: str, subscriptions: Sequence[Subscription]) -> Router | None:
        """:func:`~pgbus.hookspecs.pgbus_router`."""
        found: Router | None = self.hook.pgbus_router(channel=channel, subscriptions=subscriptions)
        return found

    def middleware(self, subscription: Subscription) -> builtins.list[Middleware]:
        """:func:`~pgbus.hookspecs.pgbus_handler_middleware`: outermost first."""
        found = self.hook.pgbus_handler_middleware(subscription=subscription)
        return [mw for mw in found if mw is not None]

    def backoff(self, attempt: int, error: BaseException | None) -> float | None:
        """:func:`~pgbus.hookspecs.pgbus_reconnect_backoff`: seconds, or ``None`` (give up)."""
        delay: float | None = self.hook.pgbus_reconnect_backoff(attempt=attempt, error=error)
        return delay

    def publish(
        self, bus: object, outgoing: Sequence[Outgoing], connection: Any
    ) -> Awaitable[None] | None:
        """:func:`~pgbus.hookspecs.pgbus_publish`: a plugin's sender, or ``None``."""
        taken: Awaitable[None] | None = self.hook.pgbus_publish(
            bus=bus, outgoing=outgoing, connection=connection
        )
        return taken

    def schedule(
        self, bus: object, outgoing: Sequence[Outgoing], due: float, connection: Any
    ) -> Awaitable[None] | None:
        """:func:`~pgbus.hookspecs.pgbus_schedule`: a plugin's store for later, or ``None``."""
        taken: Awaitable[None] | None = self.hook.pgbus_schedule(
            bus=bus, outgoing=outgoing, due=due, connection=connection
        )
        return taken

    def cancel(self, bus: object, event_id: str) -> Awaitable[bool] | None:
        """:func:`~pgbus.hookspecs.pgbus_cancel`: a plugin's cancellation, or ``None``."""
        taken: Awaitable[bool] | None = self.hook.pgbus_cancel(bus=bus, event_id=event_id)
        return taken

    def resolve_reference(
        self, bus: object, message: Message, reference: Mapping[str, Any]
    ) -> Awaitable[Message | None] | None:
        """:func:`~pgbus.hookspecs.pgbus_resolve_reference`: a plugin's fetch, or ``None``."""
        taken: Awaitable[Message | None] | None = self.hook.pgbus_resolve_reference(
            bus=bus, message=message, reference=reference
        )
        return taken

    # -- observer hooks (guarded: a failing plugin is logged and counted) ---------------

    def on_published(self, outgoing: Sequence[Outgoing]) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_published`."""
        self._notify("pgbus_on_published", {"outgoing": outgoing})

    def on_received(self, messages: Sequence[Message]) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_received`."""
        self._notify("pgbus_on_received", {"messages": messages})

    def on_handled(self, subscription: Subscription, delivery: Delivery, duration: float) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_handled`."""
        self._notify(
            "pgbus_on_handled",
            {"subscription": subscription, "delivery": delivery, "duration": duration},
        )

    def on_dropped(self, subscription: Subscription, delivery: Delivery, policy: Overflow) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_dropped`."""
        self._notify(
            "pgbus_on_dropped",
            {"subscription": subscription, "delivery": delivery, "policy": policy},
        )

    def on_slow_handler(
        self, subscription: Subscription, delivery: Delivery, elapsed: float
    ) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_slow_handler`."""
        self._notify(
            "pgbus_on_slow_handler",
            {"subscription": subscription, "delivery": delivery, "elapsed": elapsed},
        )

    async def on_decode_error(self, message: Message, error: BaseException) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_decode_error`."""
        await self._announce("pgbus_on_decode_error", {"message": message, "error": error})

    async def on_handler_error(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_handler_error`."""
        await self._announce(
            "pgbus_on_handler_error",
            {"subscription": subscription, "delivery": delivery, "error": error},
        )

    async def on_retry(
        self,
        subscription: Subscription,
        delivery: Delivery,
        attempt: int,
        delay: float,
        error: BaseException,
    ) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_retry`."""
        await self._announce(
            "pgbus_on_retry",
            {
                "subscription": subscription,
                "delivery": delivery,
                "attempt": attempt,
                "delay": delay,
                "error": error,
            },
        )

    async def on_dead_letter(self, dead_letter: DeadLetter) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_dead_letter`."""
        await self._announce("pgbus_on_dead_letter", {"dead_letter": dead_letter})

    async def on_connect(self, bus: object, channels: Sequence[str]) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_connect`."""
        await self._announce("pgbus_on_connect", {"bus": bus, "channels": channels})

    async def on_disconnect(self, bus: object, error: BaseException | None) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_disconnect`."""
        await self._announce("pgbus_on_disconnect", {"bus": bus, "error": error})

    async def on_resync(
        self, bus: object, channels: Sequence[str], disconnected_at: float, reconnected_at: float
    ) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_resync`."""
        await self._announce(
            "pgbus_on_resync",
            {
                "bus": bus,
                "channels": channels,
                "disconnected_at": disconnected_at,
                "reconnected_at": reconnected_at,
            },
        )

    async def on_terminal_error(self, bus: object, error: ListenerError) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_terminal_error`."""
        await self._announce("pgbus_on_terminal_error", {"bus": bus, "error": error})

    async def on_stop(self, bus: object) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_stop`."""
        await self._announce("pgbus_on_stop", {"bus": bus})

    async def on_stopped(self, bus: object) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_stopped`."""
        await self._announce("pgbus_on_stopped", {"bus": bus})

    # -- hooks whose errors are the caller's ---------------------------------------------

    async def on_start(self, bus: object) -> None:
        """:func:`~pgbus.hookspecs.pgbus_on_start`: an error fails ``start()``."""
        await await_all(self.hook.pgbus_on_start(bus=bus))

    async def migrate(self, bus: object) -> None:
        """:func:`~pgbus.hookspecs.pgbus_migrate`: an error fails ``migrate()``."""
        await await_all(self.hook.pgbus_migrate(bus=bus))

    # -- reports made of several hooks (the dispatcher and the durable consumer) --------

    async def undecodable(self, message: Message, error: BaseException) -> None:
        """Report a notification no decoder accepts: log, decode-error hook, dead letter.

        .. versionadded:: 0.2.0
        """
        logger.warning("%s", error, extra={"channel": message.channel})
        await self.on_decode_error(message, error)
        await self.on_dead_letter(DeadLetter.from_decode_error(message, error))

    async def gave_up(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """Report a handler that failed for good: log, handler-error hook, dead letter.

        .. versionadded:: 0.2.0
        """
        logger.error(
            "handler %s failed on %s: %r",
            subscription.name,
            delivery.channel,
            error,
            exc_info=error,
            extra={"channel": delivery.channel},
        )
        await self.on_handler_error(subscription, delivery, error)
        if not isinstance(delivery, Batch):
            await self.on_dead_letter(DeadLetter.from_failure(subscription, delivery, error))
            return
        for one in delivery.deliveries:  # the batch failed whole: each event is a dead letter
            one.attempt = delivery.attempt
            await self.on_dead_letter(DeadLetter.from_failure(subscription, one, error))

    # -- the guards ------------------------------------------------------------------------

    def _implementations(self, name: str) -> _Calls | None:
        """The implementations of hook ``name`` in call order; ``None`` with wrappers.

        Cached until a plugin is registered or unregistered.
        """
        try:
            return self._calls[name]
        except KeyError:
            pass
        caller: pluggy.HookCaller = getattr(self.hook, name)
        impls = caller.get_hookimpls()
        calls: _Calls | None = None
        if not any(impl.hookwrapper or impl.wrapper for impl in impls):
            # pluggy calls the last of its list first
            calls = tuple((i.plugin_name, i.function, tuple(i.argnames)) for i in reversed(impls))
        self._calls[name] = calls
        return calls

    def _notify(self, name: str, kwargs: dict[str, Any]) -> None:
        calls = self._implementations(name)
        if calls is None:  # wrappers: pluggy runs them all, guarded as one
            try:
                getattr(self.hook, name)(**kwargs)
            except Exception as exc:
                self._failed(name, "a wrapper", exc)
            return
        for plugin, function, args in calls:
            try:
                function(*[kwargs[a] for a in args])
            except Exception as exc:
                self._failed(name, plugin, exc)

    async def _announce(self, name: str, kwargs: dict[str, Any]) -> None:
        calls = self._implementations(name)
        if calls is None:
            try:
                await await_all(getattr(self.hook, name)(**kwargs))
            except Exception as exc:
                self._failed(name, "a wrapper", exc)
            return
        awaiting: builtins.list[tuple[str, Awaitable[Any]]] = []
        for plugin, function, args in calls:
            try:
                result = function(*[kwargs[a] for a in args])
            except Exception as exc:
                self._failed(name, plugin, exc)
                continue
            if inspect.isawaitable(result):
                awaiting.append((plugin, result))
        if awaiting:
            await self._await_guarded(name, awaiting)

    async def _await_guarded(
        self, name: str, awaiting: builtins.list[tuple[str, Awaitable[Any]]]
    ) -> None:
        """Await the ``async def`` implementations' coroutines, each failure counted."""
        if len(awaiting) == 1:
            plugin, awaitable = awaiting[0]
            try:
                await awaitable
            except Exception as exc:
                self._failed(name, plugin, exc)
            return
        results = await asyncio.gather(*(a for _, a in awaiting), return_exceptions=True)
        for (plugin, _), result in zip(awaiting, results, strict=True):
            if isinstance(result, Exception):
                self._failed(name, plugin, result)

    def _failed(self, hook: str, plugin: str, error: BaseException) -> None:
        key = f"{hook}:{plugin}"
        count = self.failures[key] = self.failures.get(key, 0) + 1
        # bounded: the 1st, 2nd, 4th, 8th, ... failure of each plugin's hook is an error
        level = logging.ERROR if count & (count - 1) == 0 else logging.DEBUG
        logger.log(
            level,
            "plugin %s: hook %s failed (%d times so far): %r",
            plugin,
            hook,
            count,
            error,
            exc_info=error,
        )
