"""Dead letters: events that could not be handled, kept with their raw payload and error.

The bus makes a :class:`DeadLetter` whenever

* a notification cannot be decoded (``subscription`` is ``None``, ``attempts`` is 0), or
* a handler failed for good: its retries were used up, or its error was not one to
  retry (``attempts`` says how many times it ran),

and passes it to every implementation of :func:`~pgbus.hookspecs.pgbus_on_dead_letter`
(which may be ``async def``: a plugin that stores dead letters in a table awaits its
``INSERT`` there). Nothing is dropped silently.

The built-in plugin, registered as ``"dead_letters"``, keeps the most recent ones in
memory (1000 by default) and logs each at warning level; ``bus.dead_letters`` lists
them. Block it by name (``Bus(disable_plugins=["dead_letters"])``) when another plugin
keeps them: the hook is still called.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from pgbus._markers import hookimpl  # pgbus.hookimpl; the core imports this module early
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from pgbus._events import Delivery, Message
    from pgbus._subscription import Subscription

logger = logging.getLogger(__name__)

#: How many dead letters the built-in plugin keeps in memory.
DEFAULT_MAX_DEAD_LETTERS = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A notification that could not be decoded, or an event whose handler gave up.

    :ivar channel: the channel it arrived on.
    :ivar payload: the raw payload, exactly as received.
    :ivar error: why: the :class:`~pgbus.DecodeError`, or what the handler raised last.
    :ivar attempts: how many times the handler ran (0 for a decode failure).
    :ivar subscription: the name of the subscription whose handler failed (``None`` for a
        decode failure).
    :ivar at: when it was given up (``time.time()``).
    :ivar id: the event's id from the envelope, when there was one.
    :ivar published_at: the publish timestamp from the envelope, when there was one.

    .. versionadded:: 0.1.0
    """

    channel: str
    payload: str
    error: BaseException
    attempts: int
    subscription: str | None = None
    at: float = dataclasses.field(default_factory=time.time)
    id: str | None = None
    published_at: float | None = None

    @classmethod
    def from_decode_error(cls, message: Message, error: BaseException) -> DeadLetter:
        """The dead letter of a notification that could not be decoded.

        :param message: the notification.
        :param error: why it was rejected.
        :returns: a dead letter with ``attempts=0`` and no subscription.
        """
        return cls(message.channel, message.payload, error, 0)

    @classmethod
    def from_failure(
        cls, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> DeadLetter:
        """The dead letter of a delivery whose handler failed for good.

        :param subscription: whose handler failed.
        :param delivery: what it failed on (its ``attempt`` is the number of attempts).
        :param error: what the handler raised last.
        :returns: the dead letter.
        """
        return cls(
            delivery.message.channel,
            delivery.message.payload,
            error,
            delivery.attempt,
            subscription.name,
            id=delivery.id,
            published_at=delivery.published_at,
        )


class DeadLetters:
    """The plugin registered as ``"dead_letters"``: the most recent dead letters, in memory.

    :param maxlen: how many to keep; older ones are forgotten (they were logged).

    .. versionadded:: 0.1.0
    """

    def __init__(self, maxlen: int = DEFAULT_MAX_DEAD_LETTERS) -> None:
        if maxlen < 1:
            raise ConfigError(f"maxlen must be at least 1, not {maxlen!r}")
        self._records: collections.deque[DeadLetter] = collections.deque(maxlen=maxlen)
        self.total = 0

    def list(self) -> list[DeadLetter]:
        """The dead letters kept, oldest first.

        :returns: a new list.
        """
        return list(self._records)

    def clear(self) -> None:
        """Forget every dead letter kept (``total`` keeps counting)."""
        self._records.clear()

    @hookimpl
    def pgbus_on_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep ``dead_letter`` and log it."""
        self._records.append(dead_letter)
        self.total += 1
        if dead_letter.subscription is None:
            logger.warning(
                "dead letter on %s: undecodable payload (%d bytes): %s",
                dead_letter.channel,
                len(dead_letter.payload),
                dead_letter.error,
                extra={"channel": dead_letter.channel},
            )
        else:
            logger.warning(
                "dead letter on %s: handler %s gave up on event %s after %d attempt(s): %r",
                dead_letter.channel,
                dead_letter.subscription,
                dead_letter.id,
                dead_letter.attempts,
                dead_letter.error,
                extra={"channel": dead_letter.channel},
            )
