"""The built-in retry plugin: run a failing handler again, with a growing delay.

Each subscription has a :class:`Retry` policy: its own (``subscribe(..., retry=Retry(…))``)
or else the bus's default (``Bus(retry=Retry(…))``), or else :data:`DEFAULT_RETRY`
(3 attempts). The plugin wraps the subscription's handler chain in a middleware that
catches the exceptions the policy names, reports each failed attempt through
:func:`~pgbus.hookspecs.pgbus_on_retry` and the log, waits, and calls the handler again
with :attr:`Delivery.attempt <pgbus.Delivery.attempt>` increased. When the attempts are
used up (or the error is not one to retry) the error goes on to the bus, which reports
it and makes a dead letter.

The retry runs inside the subscription's worker. With ``concurrency=1`` (ordered) the
following events of that subscription wait until the retries end, so order is kept; with
``concurrency=N`` the other workers go on. Other subscriptions are never held up.

Block it by name (``Bus(disable_plugins=["retry"])``): every handler then runs once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import TYPE_CHECKING

from pgbus import hookimpl
from pgbus._util import await_all
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pgbus._bus import Bus
    from pgbus._events import Delivery
    from pgbus._subscription import Subscription
    from pgbus.types import CallNext, Middleware

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """A retry policy: how many attempts, how long between them, for which errors.

    The delay after failed attempt ``n`` is ``backoff * factor ** (n - 1)``, capped at
    ``max_delay``; with ``jitter`` it is drawn uniformly from ``[delay / 2, delay]`` so
    that many failing handlers do not retry in lockstep. ``backoff`` may instead be a
    function ``(attempt) -> seconds``, which is then used as is::

        @bus.subscribe(OrderPlaced, retry=pgbus.Retry(attempts=5, backoff=0.5, on=(TimeoutError,)))
        async def charge(event: OrderPlaced) -> None: ...

    ``Retry(attempts=1)`` turns retrying off for one subscription.

    :param attempts: how many times the handler is called at most (the first call
        included); at least 1.
    :param backoff: the first delay in seconds, or a function of the failed attempt's
        number returning the delay.
    :param factor: how much each delay grows over the previous one.
    :param max_delay: the largest delay, in seconds.
    :param jitter: randomise each delay within its upper half.
    :param on: the exception types to retry; others fail at once.
    :raises ConfigError: for a policy that cannot work.

    .. versionadded:: 0.1.0
    """

    attempts: int = 3
    backoff: float | Callable[[int], float] = 0.1
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: bool = True
    on: tuple[type[Exception], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"Retry: attempts must be at least 1, not {self.attempts!r}")
        if not callable(self.backoff) and self.backoff < 0:
            raise ConfigError(f"Retry: backoff must not be negative, not {self.backoff!r}")
        if self.factor < 1:
            raise ConfigError(f"Retry: factor must be at least 1, not {self.factor!r}")
        if self.max_delay < 0:
            raise ConfigError(f"Retry: max_delay must not be negative, not {self.max_delay!r}")
        on = self.on if isinstance(self.on, tuple) else tuple(self.on)
        if not on or not all(isinstance(t, type) and issubclass(t, Exception) for t in on):
            raise ConfigError(
                "Retry: on= takes Exception subclasses (a cancelled handler is never retried)"
            )
        object.__setattr__(self, "on", on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1, 2, …).

        :param attempt: the number of the attempt that failed.
        :returns: the delay before the next attempt.
        """
        if callable(self.backoff):
            return max(0.0, float(self.backoff(attempt)))
        ceiling = min(self.max_delay, self.backoff * self.factor ** min(attempt - 1, 64))
        if self.jitter and ceiling > 0:
            return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
        return ceiling


#: The policy of subscriptions that set none, on a bus that sets none: 3 attempts,
#: 0.1 s then 0.2 s apart (jittered), for any :class:`Exception`.
DEFAULT_RETRY = Retry()


class RetryPlugin:
    """The plugin registered as ``"retry"``: one retry middleware per subscription.

    :param default: the policy of subscriptions without one on a bus without one.

    .. versionadded:: 0.1.0
    """

    def __init__(self, default: Retry = DEFAULT_RETRY) -> None:
        self.default = default
        self._bus: Bus | None = None

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Remember the bus, for its default policy and its hooks."""
        self._bus = bus

    def policy(self, subscription: Subscription) -> Retry:
        """The policy that applies to ``subscription``.

        :param subscription: the subscription.
        :returns: its own policy, else the bus's default, else this plugin's default.
        """
        if subscription.retry is not None:
            return subscription.retry
        bus_default: Retry | None = getattr(self._bus, "retry", None)
        return bus_default if bus_default is not None else self.default

    @hookimpl(tryfirst=True)  # outermost, whatever is registered later: retries wrap it all
    def pgbus_handler_middleware(self, subscription: Subscription) -> Middleware | None:
        """Wrap the handler of ``subscription`` in its retry policy (none for 1 attempt)."""
        policy = self.policy(subscription)
        if policy.attempts <= 1:
            return None
        bus = self._bus
        on_retry = bus.plugins.hook.pgbus_on_retry if bus is not None else None
        attempts = policy.attempts
        retry_on = policy.on
        name = subscription.name

        async def retry(delivery: Delivery, call_next: CallNext) -> None:
            while True:
                try:
                    await call_next(delivery)
                except retry_on as exc:
                    attempt = delivery.attempt
                    if attempt >= attempts:
                        raise
                    delay = policy.delay(attempt)
                    logger.warning(
                        "handler %s failed attempt %d of %d on %s (%r); retrying in %.3f s",
                        name,
                        attempt,
                        attempts,
                        delivery.channel,
                        exc,
                        delay,
                        extra={"channel": delivery.channel},
                    )
                    if on_retry is not None:
                        try:
                            await await_all(
                                on_retry(
                                    subscription=subscription,
                                    delivery=delivery,
                                    attempt=attempt,
                                    delay=delay,
                                    error=exc,
                                )
                            )
                        except Exception:
                            logger.exception("plugin hook pgbus_on_retry failed")
                    await asyncio.sleep(delay)
                    delivery.attempt = attempt + 1
                else:
                    return

        return retry
