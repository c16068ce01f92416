"""Every error pgbus raises, and the control-flow signals a handler may raise.

The tree::

    PgbusError
    ├── ConfigError (also ValueError)        bad arguments or configuration
    │   ├── InvalidIdentifier                a schema, table or column name PostgreSQL would reject
    │   │   └── InvalidChannel               a channel name PostgreSQL would reject or mangle
    │   └── PluginError                      a plugin that cannot be registered as written
    ├── PayloadTooLarge (also ValueError)    an encoded payload over NOTIFY's 8000-byte limit
    ├── BusClosed (also RuntimeError)        the bus was used in a state that does not allow it
    │   └── AlreadyStarted (also ConfigError) the bus is running: too late for that call
    ├── DecodeError                          a notification that no model accepts
    ├── PublishError                         a publish that did not reach PostgreSQL
    │   └── DuplicateEventId                 a durable publish whose id is taken in the journal
    ├── ListenerError                        the LISTEN connection could not be kept
    ├── ServerNotFound (also RuntimeError)   no PostgreSQL server could be found or started
    └── ClusterError (also RuntimeError)     a throwaway cluster failed to initialise, start or stop

    Nack                                     a handler's "handle this again later" (control flow)
    Reject                                   a handler's "dead-letter this now" (control flow)

Driver errors (:mod:`asyncpg`) are wrapped at one boundary and chained with ``from``, so
``exc.__cause__`` holds the original.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AlreadyStarted",
    "BusClosed",
    "ClusterError",
    "ConfigError",
    "DecodeError",
    "DuplicateEventId",
    "InvalidChannel",
    "InvalidIdentifier",
    "ListenerError",
    "Nack",
    "PayloadTooLarge",
    "PgbusError",
    "PluginError",
    "PublishError",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "ServerNotFound",
]


class PgbusError(Exception):
    """The base of every error pgbus raises."""


class ConfigError(PgbusError, ValueError):
    """An argument or a configuration value that pgbus cannot work with."""


class InvalidIdentifier(ConfigError):  # noqa: N818 - named like InvalidChannel
    """A schema, table, column, trigger or channel name PostgreSQL would reject or mangle.

    It is empty, not a ``str``, contains NUL or is over 63 bytes in UTF-8.

    PostgreSQL would reject or silently truncate it; pgbus refuses it before any SQL is
    sent. Any other name is quoted, so it is never an injection vector.

    .. versionadded:: 0.1.0
    """


class InvalidChannel(InvalidIdentifier):
    """A channel name that is empty, not a ``str``, contains NUL or is over 63 bytes.

    PostgreSQL silently truncates longer identifiers in ``LISTEN``, so a listener would
    wait on a different channel than the publisher notifies; pgbus refuses such names
    before any SQL is sent. Channels are identifiers: an :class:`InvalidIdentifier`.
    """


class PluginError(ConfigError):
    """A plugin that cannot be registered: an unknown hook, or an async ``firstresult`` hook."""


class PayloadTooLarge(PgbusError, ValueError):  # noqa: N818 - the name the public API promises
    """An encoded payload that PostgreSQL's NOTIFY would refuse (8000 bytes or more).

    :ivar size: the payload's size in bytes (UTF-8).
    :ivar limit: the largest size NOTIFY accepts.
    """

    def __init__(self, channel: str, size: int, limit: int) -> None:
        super().__init__(
            f"payload for channel {channel!r} is {size} bytes; NOTIFY accepts at most {limit}"
        )
        self.channel = channel
        self.size = size
        self.limit = limit


class BusClosed(PgbusError, RuntimeError):  # noqa: N818 - reads as a state, like httpx's
    """The bus was used after ``stop()``, or started twice."""


class AlreadyStarted(BusClosed, ConfigError):  # noqa: N818 - the name the public API promises
    """A call that must come before :meth:`~pgbus.Bus.start`, made while the bus runs.

    Subscribing with the decorator, making a durable subscription, or starting it again.
    It is a :class:`BusClosed` (what earlier versions raised) and a :class:`ConfigError`
    (the fix is in the code's order).

    .. versionadded:: 0.2.0
    """


class DecodeError(PgbusError):
    """A notification that could not be decoded into the channel's event model.

    :ivar channel: the channel it arrived on.
    :ivar payload: the raw payload, kept so that nothing is lost.
    """

    def __init__(self, channel: str, payload: str, reason: str) -> None:
        super().__init__(f"cannot decode notification on channel {channel!r}: {reason}")
        self.channel = channel
        self.payload = payload
        self.reason = reason


class PublishError(PgbusError):
    """A publish that did not reach PostgreSQL; ``__cause__`` holds the driver's error."""


class DuplicateEventId(PublishError):  # noqa: N818 - named like InvalidChannel
    """A durable publish whose event id the journal already holds for another event.

    Nothing of the batch was journaled or notified (inside the caller's transaction,
    ``publish(..., connection=conn)``, that transaction is aborted, as after any failed
    statement). Event ids are unpredictable, so
    this means a journal row was written with the id by someone else (a role that can
    write the journal, a foreign publisher reusing ids), never a pgbus collision. The
    same event published again (a retry of a publish that had in fact committed) is not
    an error: it is journaled once; but inside the caller's transaction any id the
    journal holds is one, the same event's too (the failed insert aborted it).

    :ivar event_ids: the ids the journal holds for other events (inside a transaction:
        those it holds).

    .. versionchanged:: 0.4.0 inside the caller's transaction, the same event too.

    .. versionadded:: 0.2.0
    """

    def __init__(self, event_ids: Sequence[str]) -> None:
        super().__init__(
            "event id already in the journal with another event, nothing published: "
            + ", ".join(event_ids)
        )
        self.event_ids = tuple(event_ids)


class ListenerError(PgbusError):
    """The LISTEN connection could not be (re-)established and the backoff gave up."""


class RequestTimeout(PgbusError, TimeoutError):  # noqa: N818 - the name the public API promises
    """No handler answered :meth:`Bus.request <pgbus.Bus.request>` within its timeout.

    Nothing subscribed, every handler returned ``None``, or the answer came too late.

    :ivar event_id: the id of the request event.
    :ivar timeout: the seconds waited.

    .. versionadded:: 0.3.0
    """

    def __init__(self, event_id: str, timeout: float) -> None:
        super().__init__(f"no reply to request {event_id} within {timeout} s")
        self.event_id = event_id
        self.timeout = timeout


class RequestFailed(PgbusError):  # noqa: N818 - named like RequestTimeout
    """The handler that answered :meth:`Bus.request <pgbus.Bus.request>` failed for good.

    Sent back when the handler raised on its last attempt (after its retries), or when
    its return value could not be sent (not JSON-serializable, or 8000 bytes or more).

    :ivar event_id: the id of the request event.
    :ivar error: the responder's error, as text (``"ValueError: no such order"``).

    .. versionadded:: 0.3.0
    """

    def __init__(self, event_id: str, error: str) -> None:
        super().__init__(f"request {event_id} failed in its handler: {error}")
        self.event_id = event_id
        self.error = error


class ServerNotFound(PgbusError, RuntimeError):  # noqa: N818 - reads as a state
    """No PostgreSQL server was configured, reachable or startable on this machine."""


class ClusterError(PgbusError, RuntimeError):
    """A :class:`pgbus.server.TempCluster` could not be initialised, started or stopped.

    The message includes the tail of the server's log when there is one.
    """


class Nack(Exception):  # noqa: N818 - the name the public API promises
    """Raised by a handler: handle this delivery again after ``delay``.

    The attempt counts under the subscription's :class:`~pgbus.Retry` policy: when it
    was the last one, the delivery is dead-lettered with this ``Nack`` as its error.
    Unlike a failure, a subscription does not wait for the delay in its worker: the
    delivery is queued again when the delay is over (a durable one's retry is persisted
    and survives a restart), and the events behind it are handled meanwhile. A
    key-ordered subscription (``key=``) waits in the worker, so that key's later events
    wait too::

        @bus.subscribe(OrderPlaced)
        async def charge(event: OrderPlaced) -> None:
            if not gateway.up():
                raise pgbus.Nack(delay=30)

    :param delay: seconds (or a :class:`~dt.timedelta`) before the next attempt;
        0 (the default) for at once.
    :ivar delay: the delay in seconds.
    :raises ConfigError: for a negative or non-finite delay.

    .. versionadded:: 0.3.0
    """

    def __init__(self, delay: float | dt.timedelta = 0.0) -> None:
        self.delay = _seconds(delay, "Nack: delay")
        super().__init__(f"nack, retry in {self.delay:g} s")


class Reject(Exception):  # noqa: N818 - the name the public API promises
    """Raised by a handler: dead-letter this delivery now, without retrying it.

    The dead letter's error is this ``Reject``; ``str(error)`` is the reason.

    :param reason: why the handler refuses the event.
    :ivar reason: the reason.

    .. versionadded:: 0.3.0
    """

    def __init__(self, reason: str = "rejected by the handler") -> None:
        self.reason = reason
        super().__init__(reason)


def due_time(delay: float | dt.timedelta | None, at: dt.datetime | None) -> float | None:
    """When an event published with ``delay=`` or ``at=`` is due, in epoch seconds.

    :returns: ``None`` when neither is given.
    :raises ConfigError: for both, a negative delay, or a naive (or non-datetime) ``at``.
    """
    if delay is not None and at is not None:
        raise ConfigError("publish: give delay= or at=, not both")
    if delay is not None:
        return time.time() + _seconds(delay, "publish: delay")
    if at is None:
        return None
    if not isinstance(at, dt.datetime) or at.utcoffset() is None:
        raise ConfigError(f"publish: at= must be an aware datetime (with a timezone), not {at!r}")
    return at.timestamp()


def _seconds(value: float | dt.timedelta, what: str) -> float:
    """``value`` (seconds or a ``timedelta``) as a finite, non-negative number of seconds.

    :param value: the duration.
    :param what: names the argument in the error.
    :returns: the seconds.
    :raises ConfigError: for a negative, non-finite or non-numeric value.
    """
    if isinstance(value, dt.timedelta):
        number = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ConfigError(f"{what} must be seconds or a timedelta, not {value!r}")
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"{what} must be a finite, non-negative duration, not {value!r}")
    return number
