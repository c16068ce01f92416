"""The listener: one dedicated connection that LISTENs to every channel of a Bus.

Each notification is only appended to the bus's inbound queue, straight from asyncpg's
protocol (see :class:`ListenConnection`). A supervisor task owns the connection: it
connects, LISTENs, watches for loss (asyncpg's termination callback, plus a periodic
health check that also catches half-open sockets) and reconnects after the delay the
backoff hook returns.

How a dead connection is found:

* a closed socket (server restart, ``pg_terminate_backend``, RST or FIN from the
  network): at once, through asyncpg's termination callback;
* a half-open socket (the server or the network vanished without a FIN): by the health
  check, a query with a timeout every ``health_check_interval`` seconds, so within
  interval + timeout; TCP keepalive and ``TCP_USER_TIMEOUT`` on the socket also end it
  at the kernel level when the peer stops acknowledging;
* a connection that no longer LISTENs (a proxy in between that dropped it): the health
  check compares ``pg_listening_channels()`` with the bus's channels.

At start, a NOTIFY sent on the new connection must come back to it; when it does not
(a transaction-pooling proxy such as PgBouncer makes LISTEN silently do nothing),
``start()`` fails and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from asyncpg.exceptions._base import TargetServerAttributeNotMatched

from pgbus._events import Message
from pgbus._status import ListenerState
from pgbus._util import CONNECTION_ERRORS, plural, redact_dsn
from pgbus.errors import DecodeError, ListenerError

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from pgbus._events import Notification

logger = logging.getLogger(__name__)

#: Errors after which connecting again may work (server restarting, network down, no
#: writable host during a failover, …).
RETRYABLE = (*CONNECTION_ERRORS, TimeoutError)

#: Errors that a retry will not fix without a change of configuration.
FATAL_AT_START = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    ValueError,  # a DSN asyncpg cannot parse (also its ClientConfigurationError)
    asyncpg.ReadOnlySQLTransactionError,  # "cannot execute LISTEN during recovery"
)

#: What a connection attempt (connect, LISTEN, the probe) may fail with.
CONNECT_ERRORS = (*RETRYABLE, *FATAL_AT_START, asyncpg.PostgresError, ListenerError)

#: The health check: one round trip that also tells which channels are really LISTENed.
HEALTH_QUERY = "SELECT coalesce(array_agg(c), '{}'::text[]) FROM pg_listening_channels() AS c"

#: Above this many notifications waiting in the process (not yet dispatched, or behind a
#: full subscription queue) the listener stops reading its socket (PostgreSQL queues the
#: rest). The listener checks what waits for the dispatcher; the bus adds what waits
#: behind handlers, and resumes reading below its low mark. About one socket read's
#: worth: a payload is decoded while it is still in the CPU's cache (at 5,000, a batch
#: handler received a quarter slower, and the garbage collector ran ten times as often).
INBOUND_HIGH_WATER = 500

#: TCP keepalive probes before the kernel declares the peer dead.
KEEPALIVE_COUNT = 3

#: The SQLSTATE of "invalid byte sequence for encoding": what the server of a SQL_ASCII
#: database ends the LISTEN session with when a notification for it is not UTF-8.
BAD_BYTES = "22021"

#: Why a bus does not start on a SQL_ASCII database (unless ``allow_sql_ascii=True``).
SQL_ASCII_RISK = (
    "the database's encoding is SQL_ASCII: PostgreSQL does not check that its text is"
    " UTF-8, and a NOTIFY whose payload is not makes the server end the LISTEN session"
    " (what is published until pgbus reconnects is lost)"
)
SQL_ASCII_FIX = (
    "re-create the database with ENCODING 'UTF8' (pg_dump, then restore into it), or"
    " accept the risk with Bus(allow_sql_ascii=True)"
)


class SessionEnded(ConnectionError):  # noqa: N818 - reads as what happened
    """The server ended the LISTEN session; with the error it sent, when it sent one.

    :ivar fields: the fields of the server's ErrorResponse by their one-letter codes
        (``"C"`` the SQLSTATE, ``"M"`` the message), empty when it sent none.
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        said = f": {fields.get('S', 'ERROR')} {fields.get('M', '')}" if fields else ""
        super().__init__(f"the server closed the LISTEN connection{said}")
        self.fields = dict(fields)

    @property
    def sqlstate(self) -> str | None:
        """The SQLSTATE of the server's error, if it sent one."""
        return self.fields.get("C")


class LastWords(asyncio.Protocol):
    """Sits between the listener's transport and asyncpg's protocol, keeping the last reads.

    A server that ends an idle session sends an ErrorResponse first (why: a FATAL
    ``invalid byte sequence`` in a SQL_ASCII database, an administrator's
    ``pg_terminate_backend``); asyncpg's protocol, expecting nothing, discards it. The
    two last chunks read are kept (a reference each, no copy) so :func:`server_error`
    can read it when the connection is lost.
    """

    __slots__ = ("inner", "last", "previous")

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner: Any = inner  # asyncpg's protocol
        self.previous = self.last = b""

    def data_received(self, data: bytes) -> None:
        """Keep ``data`` and hand it to asyncpg."""
        self.previous, self.last = self.last, data
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Hand the end of the stream to asyncpg."""
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        """Hand the loss to asyncpg."""
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Hand flow control to asyncpg."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Hand flow control to asyncpg."""
        self.inner.resume_writing()

    @classmethod
    def install(cls, conn: asyncpg.Connection) -> LastWords | None:
        """Put one between ``conn``'s transport and protocol (asyncpg has no API for it)."""
        transport = getattr(conn, "_transport", None)
        if transport is None:  # pragma: no cover - every asyncpg connection has one
            return None
        tap = cls(transport.get_protocol())
        transport.set_protocol(tap)
        return tap

    def server_error(self) -> dict[str, str]:
        """The fields of the ErrorResponse the stream ended with (empty if it did not)."""
        return server_error(self.previous + self.last)


def server_error(tail: bytes) -> dict[str, str]:
    """The fields of the ErrorResponse that ends ``tail`` (the last bytes the server sent).

    A message is its type byte, a 4-byte length (itself included) and a body; an
    ErrorResponse (``E``) body is fields of a code byte and a NUL-terminated string,
    then a NUL.
    """
    at = tail.rfind(b"E")
    while at >= 0:
        if (
            len(tail) - at - 1 == int.from_bytes(tail[at + 1 : at + 5], "big")
            and tail[-1:] == b"\0"
        ):
            fields = tail[at + 5 : -1].split(b"\0")
            return {
                chr(field[0]): field[1:].decode("utf-8", "replace") for field in fields if field
            }
        at = tail.rfind(b"E", 0, at)
    return {}


class ListenerHost(Protocol):
    """What the listener reports to (the bus's dispatcher)."""

    #: Notifications to dispatch; the listener appends, the host takes.
    inbound: deque[Notification]

    def inbound_ready(self) -> None:
        """A notification was put into the empty inbound queue."""

    async def on_connected(
        self, channels: Sequence[str], disconnected_at: float | None, reconnected_at: float
    ) -> None:
        """LISTEN is in place on a new connection."""

    async def on_disconnected(self, error: BaseException | None) -> None:
        """The connection was lost."""

    async def on_terminal_error(self, error: ListenerError) -> None:
        """Reconnecting gave up."""

    async def undecodable(self, message: Message, error: BaseException) -> None:
        """A notification could not be decoded (here: the server could not even send it)."""

    def backoff(self, attempt: int, error: BaseException | None) -> float | None:
        """Seconds before connection attempt ``attempt``, or ``None`` to give up."""


def explain(error: BaseException) -> str:
    """A hint for the log and for errors: what ``error`` probably means for a listener."""
    if isinstance(error, asyncpg.ReadOnlySQLTransactionError):
        return (
            f"{error} (the server is a hot standby or read-only: LISTEN needs the primary;"
            " point the DSN at it, or list every host and add"
            " target_session_attrs=read-write)"
        )
    if isinstance(error, TargetServerAttributeNotMatched):
        return f"{error} (no host is writable yet: a failover may be under way)"
    return str(error) or type(error).__name__


def set_keepalive(conn: asyncpg.Connection, interval: float, timeout: float) -> bool:
    """Turn on TCP keepalive and ``TCP_USER_TIMEOUT`` on ``conn``'s socket.

    asyncpg has no option for this (libpq's ``keepalives_*`` DSN parameters would be sent
    to the server as settings), so it is set on the socket of the connection's transport.

    :returns: whether it was set (``False`` for Unix sockets).
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    idle = max(1, math.ceil(interval))
    probe = max(1, math.ceil(timeout / KEEPALIVE_COUNT))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), probe),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        # Unacknowledged data (a query in flight to a vanished peer) fails after this.
        (
            socket.IPPROTO_TCP,
            getattr(socket, "TCP_USER_TIMEOUT", None),
            math.ceil((interval + timeout) * 1000),
        ),
    ]
    try:
        for level, option, value in options:
            if option is not None:
                sock.setsockopt(level, option, value)
    except OSError as exc:  # pragma: no cover - a platform without one of them
        logger.debug("cannot set TCP keepalive on the listener socket: %s", exc)
        return False
    return True


def _can_take_notifications() -> bool:
    """Whether asyncpg's per-notification method is the one :class:`ListenConnection` overrides."""
    method = getattr(asyncpg.Connection, "_process_notification", None)
    try:
        params = list(inspect.signature(method).parameters) if callable(method) else []
    except (TypeError, ValueError):  # pragma: no cover - a compiled method without a signature
        return False
    return params == ["self", "pid", "channel", "payload"]


class ListenConnection(asyncpg.Connection):
    """The listener's connection: notifications of its channels go straight to the bus.

    asyncpg hands each notification to a listener callback through ``loop.call_soon``: a
    handle, a context and an argument tuple per notification, and an event-loop turn
    before the bus sees it. At tens of thousands of notifications a second that is a
    fifth of the receive path's cost, and the handles waiting in the loop (about 1,500
    per socket read) are objects the garbage collector has to promote and scan.

    This subclass, passed through asyncpg's public ``connect(connection_class=...)``,
    overrides the one method asyncpg's protocol calls per notification, and hands the
    notifications of the listener's channels to it directly; other channels (the start
    probe) take asyncpg's usual path. It is used only when that method has the expected
    signature (:data:`DIRECT_NOTIFICATIONS`), and not when the caller passes a
    ``connection_class`` of their own; otherwise notifications come through the
    ``add_listener`` callbacks, which are registered in every case.
    """

    __slots__ = ("pgbus_listener",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pgbus_listener: Listener | None = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        listener = self.pgbus_listener
        if listener is not None and channel in listener.wanted:
            listener.take(pid, channel, payload)
        else:
            super()._process_notification(pid, channel, payload)  # type: ignore[misc]  # not in asyncpg's stubs


#: Whether the listener takes notifications from asyncpg's protocol directly
#: (:class:`ListenConnection`); else through ``add_listener`` callbacks only.
DIRECT_NOTIFICATIONS = _can_take_notifications()


class Inlet:
    """What the listener of either transport shares: the channels, its state, taking in.

    :param host: what the notifications are handed to (the bus's dispatcher).
    """

    def __init__(self, host: ListenerHost) -> None:
        self._host = host
        self._inbound = host.inbound
        #: The channels to LISTEN to (a dict: ordered, and a fast ``in`` per notification).
        self.wanted: dict[str, None] = {}
        self.terminal_error: ListenerError | None = None
        self.reconnects = 0
        #: Notifications received over the bus's life (the health check watches it move).
        self.notifications = 0
        #: Whether reading is paused (back-pressure), and how often it was.
        self.paused = False
        self.pauses = 0
        self.last_error: BaseException | None = None
        self.state = ListenerState.STARTING
        self.state_since = time.time()

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels LISTENed to (or to be, once connected)."""
        return tuple(self.wanted)

    def set_channels(self, channels: Iterable[str]) -> None:
        """Set the channels to LISTEN to once started (before :meth:`start` only)."""
        self.wanted = dict.fromkeys(channels)

    def _set_state(self, state: ListenerState) -> None:
        if state is not self.state:
            self.state = state
            self.state_since = time.time()

    def pause_reading(self) -> None:
        """Stop taking notifications in until :meth:`resume_reading` (handlers are behind)."""
        if not self.paused:
            self.paused = True
            self.pauses += 1

    def resume_reading(self) -> None:
        """Take notifications in again."""
        self.paused = False

    def take(self, pid: int, channel: str, payload: str) -> None:
        """Take one notification in: called for every one, so no await and one tuple."""
        self.notifications += 1
        inbound = self._inbound
        if not inbound:  # the host may be waiting for one
            self._host.inbound_ready()
        inbound.append((channel, payload, pid, time.time()))
        if len(inbound) >= INBOUND_HIGH_WATER and not self.paused:
            self.pause_reading()


class Listener(Inlet):
    """Owns the LISTEN connection of one Bus and keeps it alive.

    :param dsn: returns where to connect (asked at each connection attempt).
    """

    def __init__(
        self,
        dsn: Callable[[], str],
        host: ListenerHost,
        *,
        connect_timeout: float,
        health_check_interval: float,
        health_check_timeout: float,
        connect_kwargs: Mapping[str, Any],
        allow_sql_ascii: bool = False,
    ) -> None:
        super().__init__(host)
        self._dsn = dsn
        self._allow_sql_ascii = allow_sql_ascii
        self._last_words: LastWords | None = None
        self._connect_timeout = connect_timeout
        self._health_interval = health_check_interval
        self._health_timeout = health_check_timeout
        self._connect_kwargs = dict(connect_kwargs)
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.connected_since: float | None = None
        #: ``(disconnected_at, reconnected_at)`` of the last reconnect.
        self.last_gap: tuple[float, float] | None = None

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up."""
        return self._conn is not None and not self._conn.is_closed()

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend pid of the LISTEN connection, while connected."""
        return self._conn.get_server_pid() if self.connected and self._conn else None

    def pause_reading(self) -> None:
        """Stop reading notifications from the socket until :meth:`resume_reading`.

        PostgreSQL keeps what is not read in its notification queue, so memory in this
        process stays bounded while handlers catch up. asyncpg has no public API for
        this; the connection's transport is paused directly.
        """
        transport = getattr(self._conn, "_transport", None)
        if transport is not None and not self.paused:
            transport.pause_reading()
            self.paused = True
            self.pauses += 1
            logger.debug("listener paused reading: handlers are behind")

    def resume_reading(self) -> None:
        """Read notifications from the socket again."""
        transport = getattr(self._conn, "_transport", None)
        if self.paused:
            self.paused = False
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
                logger.debug("listener resumed reading")

    async def _listening_channels(self, conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
        async with self._lock:
            listening = await conn.fetchval(HEALTH_QUERY)
            return list(listening or ()), list(self.wanted)

    def _callback(self, _conn: object, pid: int, channel: str, payload: object) -> None:
        """The ``add_listener`` callback (when :data:`DIRECT_NOTIFICATIONS` is off)."""
        self.take(pid, channel, str(payload))

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - a start deadline the caller sets
        """Start the supervisor and return once LISTEN is in place.

        :raises ListenerError: when no connection could be made within ``timeout``
            seconds, or the error cannot be fixed by retrying (bad password, no such
            database, a hot standby, a proxy on which LISTEN does nothing).
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
                f"could not connect to {redact_dsn(self._dsn())} within {timeout:g} s"
                + (f": {explain(cause)}" if cause else "")
            ) from cause
        except BaseException:
            await self.stop()
            raise

    async def wait(self) -> None:
        """Wait until the supervisor ends (stopped, or the backoff gave up)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Close the connection without reading what is still queued for it; end the supervisor.

        Nothing more is read from the socket: the server's backlog of notifications for
        this connection (possibly millions, while reading was paused) is not pulled into
        the process just to be thrown away. The session ends its LISTENs with it.
        """
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed():
                if isinstance(conn, ListenConnection):
                    conn.pgbus_listener = None
                close_unread(conn)
        self.paused = False
        if self.state is not ListenerState.FAILED:
            self._set_state(ListenerState.STOPPED)

    async def listen(self, channel: str) -> None:
        """Add ``channel``; LISTEN at once when connected."""
        async with self._lock:
            if channel in self.wanted:
                return
            self.wanted[channel] = None
            conn = self._conn
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(
                        conn.add_listener(channel, self._callback), self._health_timeout
                    )
                except TimeoutError:  # wedged: the watcher sees the end and reconnects
                    logger.warning("LISTEN %s got no answer; replacing the connection", channel)
                    conn.terminate()
                except RETRYABLE as exc:  # the reconnect will LISTEN it
                    logger.info("LISTEN %s deferred to the reconnect: %s", channel, exc)

    async def unlisten(self, channel: str) -> None:
        """Remove ``channel``; UNLISTEN at once when connected."""
        async with self._lock:
            if self.wanted.pop(channel, False) is False:
                return
            conn = self._conn
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(
                        conn.remove_listener(channel, self._callback), self._health_timeout
                    )
                except TimeoutError:
                    logger.warning("UNLISTEN %s got no answer; replacing the connection", channel)
                    conn.terminate()
                except RETRYABLE as exc:  # the connection is gone, and the channel with it
                    logger.info("UNLISTEN %s on a lost connection: %s", channel, exc)

    # -- the supervisor --------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        kwargs = self._connect_kwargs
        direct = DIRECT_NOTIFICATIONS and "connection_class" not in kwargs
        if direct:
            kwargs = {**kwargs, "connection_class": ListenConnection}
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn(), timeout=self._connect_timeout, **kwargs
        )
        if isinstance(conn, ListenConnection):
            conn.pgbus_listener = self
        try:
            self._check_encoding(conn)
            self._last_words = LastWords.install(conn)
            set_keepalive(conn, self._health_interval, self._health_timeout)
            async with self._lock:
                for channel in self.wanted:
                    await asyncio.wait_for(
                        conn.add_listener(channel, self._callback), self._connect_timeout
                    )
                if self._ready is not None and not self._ready.done():
                    await self._probe(conn)
                self._conn = conn
                self.paused = False
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _check_encoding(self, conn: asyncpg.Connection) -> None:
        """Refuse a SQL_ASCII database unless allowed.

        :raises ListenerError: on a SQL_ASCII database without ``allow_sql_ascii``.
        """
        if conn.get_settings().server_encoding == "SQL_ASCII" and not self._allow_sql_ascii:
            raise ListenerError(
                f"cannot listen on {redact_dsn(self._dsn())}: {SQL_ASCII_RISK}; {SQL_ASCII_FIX}"
            )

    async def _probe(self, conn: asyncpg.Connection) -> None:
        """Check that a NOTIFY sent on ``conn`` comes back to it.

        :raises ListenerError: when it does not (LISTEN does nothing on this connection).
        """
        came_back = asyncio.get_running_loop().create_future()

        def on_probe(*_args: object) -> None:
            if not came_back.done():
                came_back.set_result(None)

        probe = f"pgbus_probe_{uuid.uuid4().hex[:16]}"
        timeout = self._health_timeout
        await asyncio.wait_for(conn.add_listener(probe, on_probe), timeout)
        try:
            await conn.execute("SELECT pg_notify($1, '')", probe, timeout=timeout)
            try:
                await asyncio.wait_for(came_back, timeout)
            except TimeoutError:
                raise ListenerError(
                    f"LISTEN does nothing on {redact_dsn(self._dsn())}: a NOTIFY sent on the"
                    f" listener's own connection did not come back within {timeout:g} s."
                    " Is a transaction-pooling proxy (PgBouncer with pool_mode=transaction"
                    " or statement) between pgbus and PostgreSQL? The listener needs a"
                    " session: connect it to PostgreSQL directly, or through session pooling."
                ) from None
        finally:
            if not conn.is_closed():
                await asyncio.wait_for(conn.remove_listener(probe, on_probe), timeout)

    async def _supervise(self) -> None:
        try:
            await self._reconnect_loop()
        except Exception as exc:  # a bug: report it rather than die silently
            logger.exception("the listener's supervisor failed")
            await self._give_up(0, exc, prefix="the listener failed")
        finally:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ListenerError("the listener stopped before it started"))
                self._ready.exception()  # mark it retrieved: start() may be gone

    async def _reconnect_loop(self) -> None:
        # ``attempt`` counts failures in a row. A connection lost before it lived through
        # one health-check interval counts as a failure too, so that a server that
        # accepts and then drops the listener at once gets ever longer delays (and a
        # bounded log rate), never a tight loop.
        attempt = 0
        error: BaseException | None = None
        disconnected_at: float | None = None
        while True:
            if attempt:
                delay = self._host.backoff(attempt, error)
                if delay is None:
                    await self._give_up(attempt, error)
                    return
                if await self._sleep(delay):
                    return
            try:
                conn = await self._connect()
            except CONNECT_ERRORS as exc:
                if self._fail_start(exc):
                    return
                attempt, error = attempt + 1, exc
                self.last_error = exc
                self._log_attempt(attempt, exc)
                continue
            failures_before, attempt = attempt, 0
            up_since = time.monotonic()
            await self._connected(disconnected_at)
            error = await self._watch(conn)
            if error is None:  # stopping
                return
            self.last_error = error
            disconnected_at = time.time()
            if isinstance(error, SessionEnded) and error.sqlstate == BAD_BYTES:
                await self._report_bad_bytes(conn, error)
            self.connected_since = None
            self._set_state(ListenerState.RECONNECTING)
            async with self._lock:
                if self._conn is conn:
                    self._conn = None
            stable = time.monotonic() - up_since >= self._health_interval
            attempt = 1 if stable else failures_before + 1
            level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
            logger.log(level, "listener connection lost: %s", explain(error))
            await self._host.on_disconnected(error)

    async def _report_bad_bytes(self, conn: asyncpg.Connection, error: SessionEnded) -> None:
        """Report the notification the server ended the session over, as undecodable.

        Its channel is known only when the bus listens on one; its payload never arrived.
        """
        channel = next(iter(self.wanted)) if len(self.wanted) == 1 else ""
        reason = (
            f"the server ended the LISTEN session instead of sending a notification that is"
            f" not UTF-8 ({error.fields.get('M', '')}); {SQL_ASCII_RISK}; {SQL_ASCII_FIX}"
        )
        message = Message(channel, "", conn.get_server_pid(), time.time())
        decode_error = DecodeError(channel, "", reason)
        decode_error.__cause__ = error
        await self._host.undecodable(message, decode_error)

    async def _connected(self, disconnected_at: float | None) -> None:
        now = time.time()
        self.connected_since = now
        self._set_state(ListenerState.CONNECTED)
        if disconnected_at is not None:
            self.reconnects += 1
            self.last_gap = (disconnected_at, now)
            logger.info(
                "listener reconnected after %.3f s; LISTEN re-issued on %s",
                now - disconnected_at,
                plural(len(self.wanted), "channel"),
            )
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        await self._host.on_connected(self.channels, disconnected_at, now)

    def _fail_start(self, error: BaseException) -> bool:
        """Fail start() on an error that retrying cannot fix; ``True`` when it did."""
        if not isinstance(error, (*FATAL_AT_START, ListenerError)):
            return False
        if self._ready is None or self._ready.done():
            return False  # running already: keep trying, the database may come back
        self.last_error = error
        failure = ListenerError(f"cannot listen on {redact_dsn(self._dsn())}: {explain(error)}")
        failure.__cause__ = error
        self._ready.set_exception(error if isinstance(error, ListenerError) else failure)
        return True

    async def _give_up(
        self, attempt: int, error: BaseException | None, *, prefix: str = ""
    ) -> None:
        message = prefix or (
            f"gave up reconnecting to {redact_dsn(self._dsn())} after {attempt - 1} attempts"
        )
        self.terminal_error = ListenerError(message + (f": {explain(error)}" if error else ""))
        self.terminal_error.__cause__ = error
        self._set_state(ListenerState.FAILED)
        logger.error("%s", self.terminal_error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self.terminal_error)
            return  # start() raises it; the bus never ran
        await self._host.on_terminal_error(self.terminal_error)

    def _log_attempt(self, attempt: int, error: BaseException) -> None:
        # Bounded: attempts 1, 2, 4, 8, … are warnings, the rest debug.
        level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
        logger.log(
            level,
            "cannot connect the listener to %s (attempt %d): %s",
            redact_dsn(self._dsn()),
            attempt,
            explain(error),
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
        last_words = self._last_words

        def on_terminated(_conn: object) -> None:
            if not lost.done():
                said = last_words.server_error() if last_words is not None else {}
                lost.set_result(SessionEnded(said))

        conn.add_termination_listener(on_terminated)
        stopping = self._stopping
        if stopping is None:  # pragma: no cover - start() sets it
            return None
        try:
            if conn.is_closed():  # lost before the listener was added
                on_terminated(conn)
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
                    if lost.done():  # it was closed meanwhile: report why
                        return lost.result()
                    conn.terminate()
                    return problem
        finally:
            conn.remove_termination_listener(on_terminated)

    async def _health_check(self, conn: asyncpg.Connection) -> BaseException | None:
        """One round trip with a deadline; also checks that every channel is LISTENed.

        The answer arrives behind every notification already in the socket, so a
        listener that is far behind a flood would miss the deadline on a healthy
        connection (and reconnecting would lose the backlog). While notifications keep
        arriving the connection is alive: the deadline is extended until they stop.
        """
        if self.paused:  # no answer can arrive while reading is paused
            return None
        timeout = self._health_timeout
        query = asyncio.ensure_future(self._listening_channels(conn))
        try:
            while True:
                seen = self.notifications
                done, _ = await asyncio.wait([query], timeout=timeout)
                if done:
                    break
                if self.notifications == seen and not self.paused and not await _settles(query):
                    return TimeoutError(
                        f"health check got no answer within {timeout:g} s (half-open connection?)"
                    )
            listening, expected = query.result()
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            return exc
        finally:
            if not query.done():
                query.cancel()
                with contextlib.suppress(asyncio.CancelledError, *RETRYABLE):
                    await query
        missing = sorted(set(expected).difference(listening or ()))
        if missing:
            return ListenerError(
                f"the connection no longer LISTENs to {', '.join(missing)}"
                " (was UNLISTEN run on it, or is a pooling proxy in between?)"
            )
        return None


#: PostgreSQL's Terminate message: the session ends without an error on the server side.
_TERMINATE = b"X\x00\x00\x00\x04"


def close_unread(conn: asyncpg.Connection) -> None:
    """Close ``conn`` politely without reading from it any more.

    asyncpg's ``close()`` sends Terminate and then waits for the end of the stream, which
    means reading everything the server still sends first; ``terminate()`` drops the
    socket without a word, which the server logs as an unexpected EOF. This sends
    Terminate, lets the transport flush it and close, and keeps reading paused.
    """
    transport = getattr(conn, "_transport", None)
    if transport is not None and not transport.is_closing():
        transport.pause_reading()
        transport.write(_TERMINATE)
        transport.close()  # flushes what was written, then closes
    conn.terminate()  # asyncpg's own bookkeeping; the transport is closing already


async def _settles(task: asyncio.Future[Any]) -> bool:
    """Whether ``task`` finishes within a few loop iterations.

    On a busy loop the answer may have been read in the same iteration as the deadline
    fired, with the task's last step still scheduled: that is not a timeout.
    """
    for _ in range(3):
        if task.done():
            return True
        await asyncio.sleep(0)
    return task.done()
