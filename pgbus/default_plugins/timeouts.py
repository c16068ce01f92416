"""The built-in timeouts plugin: handler timeouts and a watchdog for slow handlers.

Per subscription:

* ``timeout=`` seconds: an attempt that runs longer is cancelled and fails with
  :class:`TimeoutError` (which the retry policy may retry; ``on=(TimeoutError,)``). With
  ``on_timeout="report"`` it is only reported (log at error level and
  :func:`~pgbus.hookspecs.pgbus_on_slow_handler`) and left to finish.
* ``warn_after=`` seconds (default: the plugin's ``warn_after``, 10 s): an attempt still
  running after that long is reported once, as a warning in the log and through
  :func:`~pgbus.hookspecs.pgbus_on_slow_handler`. It keeps running.

The watchdog costs one dictionary insert and delete per handler call, and one timer per
subscription that is re-armed at most once per threshold, not one timer per event.

A plain ``def`` handler runs in a worker thread; Python cannot stop a thread, so a
cancelled synchronous handler goes on running in its thread after its attempt failed.

Block it by name (``Bus(disable_plugins=["timeouts"])``): no timeouts and no watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from pgbus._markers import hookimpl
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from pgbus._bus import Bus
    from pgbus._events import Delivery
    from pgbus._subscription import Subscription
    from pgbus.types import CallNext, Middleware

logger = logging.getLogger(__name__)

#: Seconds after which a running handler is reported as slow, unless its subscription
#: sets ``warn_after``.
DEFAULT_WARN_AFTER = 10.0


class _Watch:
    """The running attempts of one subscription and the one timer that checks them."""

    __slots__ = ("bus", "due", "handle", "inflight", "subscription", "thresholds")

    def __init__(
        self, bus: Bus | None, subscription: Subscription, thresholds: list[tuple[float, bool]]
    ) -> None:
        self.bus = bus
        self.subscription = subscription
        #: ``(seconds, is_timeout)``, ascending.
        self.thresholds = thresholds
        #: key -> [started, delivery, index of the next threshold]
        self.inflight: dict[int, list[object]] = {}
        self.handle: asyncio.TimerHandle | None = None
        #: when the timer fires (``time.monotonic()``), ``inf`` while it is not armed
        self.due = math.inf

    def arm(self, due: float, now: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.due = due
        self.handle = asyncio.get_running_loop().call_later(max(due - now, 0.0), self.check)

    def check(self) -> None:
        self.handle = None
        self.due = math.inf
        now = time.monotonic()
        thresholds = self.thresholds
        nearest = math.inf
        for entry in list(self.inflight.values()):
            started: float = entry[0]  # type: ignore[assignment]
            index: int = entry[2]  # type: ignore[assignment]
            elapsed = now - started
            while index < len(thresholds) and elapsed >= thresholds[index][0]:
                self.report(entry[1], elapsed, is_timeout=thresholds[index][1])  # type: ignore[arg-type]
                index += 1
            entry[2] = index
            if index < len(thresholds):
                nearest = min(nearest, started + thresholds[index][0])
        if nearest < math.inf:
            self.arm(nearest, now)

    def report(self, delivery: Delivery, elapsed: float, *, is_timeout: bool) -> None:
        sub = self.subscription
        if is_timeout:
            logger.error(
                "handler %s passed its timeout of %.3f s on %s (still running: on_timeout=report)",
                sub.name,
                sub.timeout,
                delivery.channel,
                extra={"channel": delivery.channel},
            )
        else:
            logger.warning(
                "handler %s has been running for %.3f s on %s (event %s, attempt %d)",
                sub.name,
                elapsed,
                delivery.channel,
                delivery.id,
                delivery.attempt,
                extra={"channel": delivery.channel},
            )
        if self.bus is not None:
            self.bus.plugins.on_slow_handler(sub, delivery, elapsed)


class Timeouts:
    """The plugin registered as ``"timeouts"``.

    :param warn_after: seconds after which a running handler is reported as slow, for
        subscriptions that do not set ``warn_after``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, warn_after: float = DEFAULT_WARN_AFTER) -> None:
        if not warn_after > 0:
            raise ConfigError(f"warn_after must be positive, not {warn_after!r}")
        self.warn_after = warn_after
        self._bus: Bus | None = None

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Remember the bus, for its hooks."""
        self._bus = bus

    @hookimpl(trylast=True)  # innermost: the timeout bounds one attempt of the handler
    def pgbus_handler_middleware(self, subscription: Subscription) -> Middleware:
        """Bound each attempt of ``subscription``'s handler by its timeout; watch it."""
        warn_after = subscription.warn_after or self.warn_after
        timeout = subscription.timeout
        cancel = timeout is not None and subscription.on_timeout == "cancel"
        thresholds = [(warn_after, False)]
        if timeout is not None and not cancel:
            thresholds.append((timeout, True))
        thresholds.sort()
        watch = _Watch(self._bus, subscription, thresholds)
        inflight = watch.inflight
        clock = time.monotonic
        first = thresholds[0][0]
        name = subscription.name

        async def timeouts(delivery: Delivery, call_next: CallNext) -> Any:
            key = id(delivery)  # unique while it runs
            now = clock()
            inflight[key] = [now, delivery, 0]
            if watch.due > now + first:
                watch.arm(now + first, now)
            try:
                if cancel:
                    scope = asyncio.timeout(timeout)
                    try:
                        async with scope:
                            return await call_next(delivery)
                    except TimeoutError as exc:
                        if not scope.expired():  # the handler's own TimeoutError
                            raise
                        msg = f"handler {name} timed out after {timeout} s"
                        raise TimeoutError(msg) from exc
                else:
                    return await call_next(delivery)  # to reply, when it is re-registered
            finally:
                del inflight[key]

        return timeouts
