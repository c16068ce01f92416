"""The built-in reconnect strategy: capped exponential backoff with full jitter.

The delay before attempt ``n`` is uniform in ``[0, min(cap, base * 2 ** (n - 1))]``
(AWS's "full jitter"), so a fleet of listeners that lost the same server does not come
back in lockstep. It runs last (``trylast``): register any plugin implementing
:func:`~pgbus.hookspecs.pgbus_reconnect_backoff` to replace it, or register a configured
instance, ``Bus(dsn, plugins=[ExponentialBackoff(base=1.0, cap=60.0)])``.

The bus asks it before each reconnect of the listener and before each retry of a publish
whose pool connection broke. ``None`` (``max_attempts`` exhausted) means give up: the
listener reports a terminal error (:func:`~pgbus.hookspecs.pgbus_on_terminal_error`), a
publish raises :class:`~pgbus.PublishError`. ``docs/how-to/replace-backoff.md`` shows
complete replacements (a fixed interval, a circuit breaker).
"""

from __future__ import annotations

import random

from pgbus._markers import hookimpl
from pgbus.errors import ConfigError


class ExponentialBackoff:
    """Capped exponential backoff with full jitter.

    :param base: the cap of the first delay, in seconds.
    :param cap: the largest delay, in seconds.
    :param max_attempts: give up after this many consecutive failed attempts
        (``None``: never give up).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, base: float = 0.1, cap: float = 10.0, max_attempts: int | None = None
    ) -> None:
        if base <= 0 or cap < base:
            raise ConfigError("backoff needs 0 < base <= cap")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1 (or None for no limit)")
        self.base = base
        self.cap = cap
        self.max_attempts = max_attempts

    def __repr__(self) -> str:
        return (
            f"ExponentialBackoff(base={self.base!r}, cap={self.cap!r},"
            f" max_attempts={self.max_attempts!r})"
        )

    def delay(self, attempt: int) -> float | None:
        """The delay before ``attempt``, or ``None`` once ``max_attempts`` is exhausted."""
        if self.max_attempts is not None and attempt > self.max_attempts:
            return None
        ceiling = min(self.cap, self.base * 2 ** min(attempt - 1, 64))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography

    @hookimpl(trylast=True)
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float | None:  # noqa: ARG002 - part of the hook's signature
        """Return the jittered delay for ``attempt``."""
        return self.delay(attempt)
