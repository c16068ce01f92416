"""Where a Bus is: :class:`BusState`, :class:`ListenerState`, :class:`BusStatus`, :class:`Gap`."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias


class BusState(enum.Enum):
    """Where a :class:`~pgbus.Bus` is in its life. A bus is single-use.

    .. versionadded:: 0.1.0
    """

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ListenerState(enum.Enum):
    """Where the LISTEN connection of a :class:`~pgbus.Bus` is.

    .. versionadded:: 0.1.0
    """

    #: :meth:`~pgbus.Bus.start` was not called yet.
    NOT_STARTED = "not_started"
    #: :meth:`~pgbus.Bus.start` is making the first connection.
    STARTING = "starting"
    #: Connected, and LISTENing to every channel.
    CONNECTED = "connected"
    #: The connection was lost; the bus is waiting (per the backoff hook) or reconnecting.
    RECONNECTING = "reconnecting"
    #: Stopped by :meth:`~pgbus.Bus.stop`.
    STOPPED = "stopped"
    #: The backoff hook gave up; :attr:`BusStatus.last_error` holds the terminal error.
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class BusStatus:
    """A snapshot of a bus's LISTEN connection, for health endpoints and dashboards.

    ::

        @app.get("/ready")
        def ready() -> Response:
            status = bus.status
            return JSONResponse(status.as_dict(), status_code=200 if status.ready else 503)

    :ivar state: the :class:`ListenerState`.
    :ivar since: when the bus entered ``state`` (``time.time()``).
    :ivar reconnects: how many times the connection was re-established.
    :ivar last_error: the error that ended the last connection or attempt, if any.
    :ivar channels: the channels the bus listens on.

    .. versionadded:: 0.1.0
    """

    state: ListenerState
    since: float
    reconnects: int
    last_error: BaseException | None
    channels: tuple[str, ...]

    @property
    def ready(self) -> bool:
        """Whether events published now will be received: connected and listening."""
        return self.state is ListenerState.CONNECTED

    def as_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values (the error as its ``repr``)."""
        return {
            "state": self.state.value,
            "ready": self.ready,
            "since": self.since,
            "reconnects": self.reconnects,
            "last_error": None if self.last_error is None else repr(self.last_error),
            "channels": list(self.channels),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Gap:
    """A time during which the bus was not listening, so notifications may have been lost.

    Given to ``on_resync`` callbacks (:meth:`~pgbus.Bus.subscribe`) after a reconnect,
    once LISTEN is in place again.

    :ivar channels: the channels that may have missed events.
    :ivar disconnected_at: when the connection was found lost (``time.time()``).
    :ivar reconnected_at: when LISTEN was re-established (``time.time()``).

    .. versionadded:: 0.1.0
    """

    channels: tuple[str, ...]
    disconnected_at: float
    reconnected_at: float

    @property
    def duration(self) -> float:
        """Seconds between the loss and the re-LISTEN."""
        return self.reconnected_at - self.disconnected_at


#: An ``on_resync`` callback: ``async def on_resync(gap: Gap) -> None`` (or a plain function).
ResyncCallback: TypeAlias = Callable[[Gap], Awaitable[None] | None]
