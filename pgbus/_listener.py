"""The listener: one dedicated connection that LISTENs to every channel of a Bus.

The asyncpg notification callback only appends the notification to the bus's inbound
queue. A supervisor task owns the connection: it connects, LISTENs, watches for loss
(asyncpg's termination callback, plus a periodic health check that also catches
half-open sockets) and reconnects after the delay the backoff hook returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from pgbus._events import Message
from pgbus._util import redact_dsn
from pgbus.errors import ListenerError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

#: Errors after which connecting again may work (server restarting, network down, …).
RETRYABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

#: Errors that a retry will not fix without a change of configuration.
FATAL_AT_START = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.ClientConfigurationError,
)


class ListenerHost(Protocol):
    """What the listener needs from its bus (hooks and the inbound queue)."""

    def _enqueue(self, message: Message) -> None: ...
    async def _on_connected(
        self, channels: Sequence[str], disconnected_at: float | None, reconnected_at: float
    ) -> None: ...
    async def _on_disconnected(self, error: BaseException | None) -> None: ...
    def _backoff(self, attempt: int, error: BaseException | None) -> float | None: ...


class Listener:
    """Owns the LISTEN connection of one Bus and keeps it alive."""

    def __init__(
        self,
        dsn: str,
        host: ListenerHost,
        *,
        connect_timeout: float,
        health_check_interval: float,
        health_check_timeout: float,
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        self._dsn = dsn
        self._host = host
        self._connect_timeout = connect_timeout
        self._health_interval = health_check_interval
        self._health_timeout = health_check_timeout
        self._connect_kwargs = dict(connect_kwargs)
        self._channels: dict[str, None] = {}
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.terminal_error: ListenerError | None = None
        self.reconnects = 0
        self.connected_since: float | None = None
        self.last_error: BaseException | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels LISTENed to (or to be, once connected)."""
        return tuple(self._channels)

    def set_channels(self, channels: Iterable[str]) -> None:
        """Set the channels to LISTEN to once started (before :meth:`start` only)."""
        self._channels = dict.fromkeys(channels)

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up."""
        return self._conn is not None and not self._conn.is_closed()

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend pid of the LISTEN connection, while connected."""
        return self._conn.get_server_pid() if self.connected and self._conn else None

    def _callback(self, _conn: object, pid: int, channel: str, payload: object) -> None:
        self._host._enqueue(Message(channel, str(payload), pid, time.time()))  # noqa: SLF001 - the host protocol

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - a start deadline the caller sets
        """Start the supervisor and return once LISTEN is in place.

        :raises ListenerError: when no connection could be made within ``timeout``
            seconds, or the error cannot be fixed by retrying (bad password, no such
            database).
        """
        loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        self._ready = loop.create_future()
        self._task = asyncio.create_task(self._supervise(), name="pgbus-listener")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            await self.stop()
            cause = self.last_error
            raise ListenerError(
                f"could not connect to {redact_dsn(self._dsn)} within {timeout:g} s"
                + (f": {cause}" if cause else "")
            ) from cause
        except BaseException:
            await self.stop()
            raise

    async def wait(self) -> None:
        """Wait until the supervisor ends (stopped, or the backoff gave up)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """UNLISTEN, close the connection and end the supervisor."""
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed():
                try:
                    await conn.execute("UNLISTEN *", timeout=self._health_timeout)
                    await conn.close(timeout=self._health_timeout)
                except (*RETRYABLE, asyncpg.PostgresError):
                    conn.terminate()

    async def listen(self, channel: str) -> None:
        """Add ``channel``; LISTEN at once when connected."""
        async with self._lock:
            if channel in self._channels:
                return
            self._channels[channel] = None
            conn = self._conn
            if conn is not None and not conn.is_closed():
                try:
                    await conn.add_listener(channel, self._callback)
                except RETRYABLE as exc:  # the reconnect will LISTEN it
                    logger.info("LISTEN %s deferred to the reconnect: %s", channel, exc)

    async def unlisten(self, channel: str) -> None:
        """Remove ``channel``; UNLISTEN at once when connected."""
        async with self._lock:
            if self._channels.pop(channel, False) is False:
                return
            conn = self._conn
            if conn is not None and not conn.is_closed():
                try:
                    await conn.remove_listener(channel, self._callback)
                except RETRYABLE as exc:  # the connection is gone, and the channel with it
                    logger.info("UNLISTEN %s on a lost connection: %s", channel, exc)

    # -- the supervisor --------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout, **self._connect_kwargs
        )
        try:
            async with self._lock:
                for channel in self._channels:
                    await conn.add_listener(channel, self._callback)
                self._conn = conn
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _supervise(self) -> None:
        attempt = 0
        error: BaseException | None = None
        disconnected_at: float | None = None
        while True:
            if attempt:
                delay = self._host._backoff(attempt, error)  # noqa: SLF001 - the host protocol
                if delay is None:
                    self._give_up(attempt, error)
                    return
                if await self._sleep(delay):
                    return
            try:
                conn = await self._connect()
            except (*FATAL_AT_START, *RETRYABLE) as exc:
                if self._fail_start(exc):
                    return
                attempt, error = attempt + 1, exc
                self.last_error = exc
                self._log_attempt(attempt, exc)
                continue
            attempt = 0
            await self._connected(disconnected_at)
            error = await self._watch(conn)
            if error is None:  # stopping
                return
            self.last_error = error
            disconnected_at = time.time()
            self.connected_since = None
            async with self._lock:
                if self._conn is conn:
                    self._conn = None
            logger.warning("listener connection lost: %s", error or "closed")
            await self._host._on_disconnected(error)  # noqa: SLF001 - the host protocol
            attempt = 1

    async def _connected(self, disconnected_at: float | None) -> None:
        now = time.time()
        self.connected_since = now
        if disconnected_at is not None:
            self.reconnects += 1
            logger.info(
                "listener reconnected after %.3f s; LISTEN re-issued on %d channels",
                now - disconnected_at,
                len(self._channels),
            )
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        await self._host._on_connected(self.channels, disconnected_at, now)  # noqa: SLF001 - the host protocol

    def _fail_start(self, error: BaseException) -> bool:
        """Fail start() on an error that retrying cannot fix; ``True`` when it did."""
        if not isinstance(error, FATAL_AT_START):
            return False
        if self._ready is None or self._ready.done():
            return False  # running already: keep trying, the database may come back
        self._ready.set_exception(
            ListenerError(f"cannot listen on {redact_dsn(self._dsn)}: {error}")
        )
        return True

    def _give_up(self, attempt: int, error: BaseException | None) -> None:
        self.terminal_error = ListenerError(
            f"gave up reconnecting to {redact_dsn(self._dsn)} after {attempt - 1} attempts"
            + (f": {error}" if error else "")
        )
        self.terminal_error.__cause__ = error
        logger.error("%s", self.terminal_error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self.terminal_error)

    def _log_attempt(self, attempt: int, error: BaseException) -> None:
        # Bounded: attempts 1, 2, 4, 8, … are warnings, the rest debug.
        level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
        logger.log(
            level,
            "cannot connect the listener to %s (attempt %d): %s",
            redact_dsn(self._dsn),
            attempt,
            error,
        )

    async def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; ``True`` when stop() was called meanwhile."""
        stopping = self._stopping
        if stopping is None:  # pragma: no cover - start() sets it
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), delay)
        return stopping.done()

    async def _watch(self, conn: asyncpg.Connection) -> BaseException | None:
        """Return the error that ended ``conn``, or ``None`` when stop() was called."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[BaseException] = loop.create_future()

        def on_terminated(_conn: object) -> None:
            if not lost.done():
                lost.set_result(ConnectionError("the server closed the LISTEN connection"))

        conn.add_termination_listener(on_terminated)
        stopping = self._stopping
        if stopping is None:  # pragma: no cover - start() sets it
            return None
        try:
            while True:
                waiting: list[asyncio.Future[Any]] = [lost, stopping]
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=self._health_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stopping in done:
                    return None
                if lost in done:
                    return lost.result()
                problem = await self._health_check(conn)
                if problem is not None:
                    conn.terminate()
                    return problem
        finally:
            conn.remove_termination_listener(on_terminated)

    async def _health_check(self, conn: asyncpg.Connection) -> BaseException | None:
        try:
            await conn.fetchval("SELECT 1", timeout=self._health_timeout)
        except TimeoutError:
            return TimeoutError(
                f"health check got no answer within {self._health_timeout:g} s"
                " (half-open connection?)"
            )
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            return exc
        return None
