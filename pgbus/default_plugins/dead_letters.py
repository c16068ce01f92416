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
import logging

from pgbus._events import DeadLetter
from pgbus._markers import hookimpl
from pgbus.errors import ConfigError

__all__ = ["DEFAULT_MAX_DEAD_LETTERS", "DeadLetter", "DeadLetters"]  # DeadLetter is a core value

logger = logging.getLogger(__name__)

#: How many dead letters the built-in plugin keeps in memory.
DEFAULT_MAX_DEAD_LETTERS = 1000


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
