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

A handler decides its outcome by raising :class:`~pgbus.Nack` (handle again after its
``delay``, an attempt under the policy whatever the policy's ``on=``) or
:class:`~pgbus.Reject` (dead-letter now, never retried). A nacked delivery of a plain
subscription does not wait in the worker: it is queued again when its delay is over
(:meth:`Subscription.defer <pgbus.Subscription.defer>`), and the events behind it go on;
a durable one's retry is persisted by the durable plugin, so it survives a restart.

Block it by name (``Bus(disable_plugins=["retry"])``): every handler then runs once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pgbus._markers import hookimpl
from pgbus._subscription import DEFAULT_RETRY, Retry
from pgbus.errors import Nack, Reject

if TYPE_CHECKING:
    from pgbus._bus import Bus
    from pgbus._events import Delivery
    from pgbus._subscription import Subscription
    from pgbus.types import CallNext, Middleware

__all__ = ["DEFAULT_RETRY", "Retry", "RetryPlugin"]  # the policy lives in the core

logger = logging.getLogger(__name__)


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
        return _retry(policy, subscription, self._bus)


def _retry(policy: Retry, subscription: Subscription, bus: Bus | None) -> Middleware:
    """The retry middleware of ``subscription``: ``policy``, and its handler's Nack and Reject."""
    on_retry = bus.plugins.on_retry if bus is not None else None
    attempts = policy.attempts
    retry_on = policy.on
    name = subscription.name
    # in place, in the worker, for a key-ordered one: the key's later events wait
    defer = None if subscription.key is not None else subscription.defer

    async def retry(delivery: Delivery, call_next: CallNext) -> None:
        while True:
            try:
                await call_next(delivery)
            except Nack as nack:
                error: Exception = nack
                delay, nacked = nack.delay, True
            except retry_on as exc:
                if isinstance(exc, Reject):  # dead-letter now
                    raise
                error = exc
                delay, nacked = policy.delay(delivery.attempt), False
            else:
                return
            attempt = delivery.attempt
            if attempt >= attempts:
                raise error
            logger.log(
                logging.INFO if nacked else logging.WARNING,
                "handler %s %s attempt %d of %d on %s (%r); again in %.3f s",
                name,
                "nacked" if nacked else "failed",
                attempt,
                attempts,
                delivery.channel,
                error,
                delay,
                extra={"channel": delivery.channel},
            )
            if on_retry is not None:
                await on_retry(subscription, delivery, attempt, delay, error)
            if nacked and defer is not None:  # the worker goes on; the delivery comes back
                defer(delivery, delay)
                return
            await asyncio.sleep(delay)  # in place: keeps the order
            delivery.attempt = attempt + 1

    return retry
