"""The publisher: encode events, and NOTIFY through a pool (never the LISTEN connection).

Events are encoded by the encoder a plugin gives for their class (found once per class),
each with a new id and the publish time. A plugin may take over sending
(:func:`~pgbus.hookspecs.pgbus_publish`: the durable plugin journals instead); otherwise
the events go out with NOTIFY, on the caller's connection or through the pool.

One event is ``SELECT pg_notify($1, $2)``; many are one statement,
``SELECT pg_notify($1, p) FROM unnest($2::text[])`` (or, across channels,
``SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[])``), so a batch costs one
round trip and is atomic. Payload sizes are checked before anything is sent.

A publish through the pool that fails because its connection broke (a server restart
left a dead connection in the pool, the network dropped) is retried on a fresh
connection, after the delay the backoff hook gives, at most ``retries`` times and
within ``timeout`` seconds in all; then it fails with :class:`~pgbus.PublishError`. A
publish on the caller's connection is never retried: the caller owns the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from pgbus._channels import MAX_PAYLOAD_BYTES
from pgbus._coalesce import Coalescer
from pgbus._drivers import DriverError, executor
from pgbus._events import NO_HEADERS, Event, Outgoing
from pgbus._memory import no_database
from pgbus._util import CONNECTION_ERRORS, keep_session, new_event_id, redact_dsn
from pgbus.errors import ConfigError, PayloadTooLarge, PublishError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from pgbus._drivers import AsyncConnection
    from pgbus._events import Encoder
    from pgbus._memory import Broker
    from pgbus._plugins import PluginManager

logger = logging.getLogger(__name__)

NOTIFY_ONE = "SELECT pg_notify($1, $2)"
NOTIFY_MANY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS t(p)"
NOTIFY_MANY_CHANNELS = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)"

#: What the driver raises when a statement or a connection fails.
DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

#: An asyncpg connection (what ``notify``, ``changes`` and the durable tools take).
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def check_size(channel: str, payload: str) -> None:
    """Raise :class:`PayloadTooLarge` when NOTIFY would refuse ``payload``."""
    # Characters bound bytes from below and 4x from above: encode only when it matters.
    if len(payload) * 4 < MAX_PAYLOAD_BYTES:
        return
    size = len(payload.encode())
    if size >= MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(channel, size, MAX_PAYLOAD_BYTES - 1)


def notify(channels: Sequence[str], payloads: Sequence[str]) -> tuple[str, tuple[object, ...]]:
    """The one statement that NOTIFYs ``payloads[i]`` on ``channels[i]``, and its arguments."""
    first = channels[0]
    if len(payloads) == 1:
        return NOTIFY_ONE, (first, payloads[0])
    if channels.count(first) == len(channels):
        return NOTIFY_MANY, (first, list(payloads))
    return NOTIFY_MANY_CHANNELS, (list(channels), list(payloads))


class Encoding:
    """Gives events their ids and publish time, and encodes them (the bus's and the sync path's).

    :param plugins: the plugin facade whose encoders are used.
    """

    def __init__(self, plugins: PluginManager) -> None:
        self._plugins = plugins
        self._encoders: dict[type[Event], tuple[str, Encoder]] = {}

    def _encoder(self, event: Event) -> tuple[str, Encoder]:
        """The channel and the encoder of ``event``'s class, found once per class."""
        cls = type(event)
        found = self._encoders.get(cls)
        if found is not None:
            return found
        if not isinstance(event, Event):
            raise ConfigError(
                f"publish takes a pgbus.Event, not {cls.__name__}; "
                "use bus.notify(channel, text) for raw payloads"
            )
        channel = cls.pgbus_channel
        if channel is None:
            raise ConfigError(f"{cls.__name__} has no channel (class keyword channel=...)")
        encode = self._plugins.encoder(cls)
        if encode is None:
            raise ConfigError(f"no plugin provides an encoder for {cls.__name__}")
        found = self._encoders[cls] = (channel, encode)
        return found

    def encode(self, events: Iterable[Event], headers: Mapping[str, str] | None) -> list[Outgoing]:
        """Give each event an id and the publish time, and encode it.

        :raises ConfigError: for something that is not a :class:`~pgbus.Event` with a
            channel, or a class no plugin can encode.
        """
        ts = time.time()
        headers = headers or NO_HEADERS
        encoder = self._encoder
        outs = []
        for event in events:
            channel, encode = encoder(event)
            out = Outgoing(channel, event, new_event_id(), ts, headers)
            out.payload = encode(out)
            outs.append(out)
        return outs


class Publisher(Encoding):
    """Encodes events and sends them: through a plugin that takes over, else NOTIFY.

    :param dsn: returns where to connect (asked when the pool is created).
    :param plugins: the bus's plugin facade (encoders, the publish take-over, backoff).
    :param owner: what the ``pgbus_publish`` hook receives as ``bus``.
    :param connect_timeout: seconds one connection attempt may take.
    :param pool_max_size: the pool's size.
    :param connect_kwargs: extra :func:`asyncpg.connect` arguments.
    :param retries: how many times a publish through the pool is retried.
    :param timeout: seconds a publish through the pool may take, retries included.
    :param memory: the broker of a ``memory://`` bus, which replaces NOTIFY and the pool.
    """

    def __init__(
        self,
        dsn: Callable[[], str],
        *,
        plugins: PluginManager,
        owner: object,
        connect_timeout: float,
        pool_max_size: int,
        connect_kwargs: Mapping[str, Any],
        retries: int = 3,
        timeout: float = 10.0,
        memory: Broker | None = None,
    ) -> None:
        super().__init__(plugins)
        self._memory = memory
        self._dsn = dsn
        self._owner = owner
        self._connect_timeout = connect_timeout
        self._pool_max_size = pool_max_size
        self._connect_kwargs = dict(connect_kwargs)
        self._backoff = plugins.backoff
        self._retries = retries
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self.retried = 0
        self._failures = 0
        #: Gathers concurrent publishes through the pool into shared statements.
        self.coalescer: Coalescer[Outgoing] = Coalescer(self._send_outgoing, lanes=pool_max_size)

    async def publish(self, outs: Sequence[Outgoing], connection: AsyncConnection | None) -> None:
        """Send encoded events: through a plugin that takes over (durable), else NOTIFY.

        :raises PayloadTooLarge: on the NOTIFY path, for a payload of 8000 bytes or more
            (nothing is sent).
        :raises PublishError: when it did not reach PostgreSQL.
        :raises ConfigError: for a ``connection`` no supported driver made.
        """
        if connection is not None:
            self._check_connection(connection)
        taken = self._plugins.publish(self._owner, outs, connection)
        if taken is not None:
            await taken
            return
        for out in outs:
            check_size(out.channel, out.payload)
        if (
            connection is None and self._memory is None
        ):  # concurrent pool publishes share statements
            await self.coalescer.submit(outs)
            return
        await self.send([o.channel for o in outs], [o.payload for o in outs], connection)

    async def _send_outgoing(self, outs: Sequence[Outgoing]) -> None:
        await self.send([o.channel for o in outs], [o.payload for o in outs])

    # -- sending --------------------------------------------------------------------------

    def _check_connection(self, connection: AsyncConnection) -> None:
        """Fail here, whoever sends, for a ``connection`` the bus cannot publish on."""
        if self._memory is not None:
            raise no_database("connection= has no transaction to join; publish without it")
        executor(connection)

    async def pool(self) -> asyncpg.Pool:
        """The publish pool, created on first use (nothing connects until it is used)."""
        pool = self._pool
        if pool is not None:
            return pool
        if self._memory is not None:
            raise no_database("there is no publish pool")
        async with self._pool_lock:
            if self._pool is None:
                # min_size=0: nothing connects here, so this does not fail while the
                # database is down; acquire() does, and is retried.
                self._pool = await asyncpg.create_pool(
                    self._dsn(),
                    min_size=0,
                    max_size=self._pool_max_size,
                    timeout=self._connect_timeout,
                    reset=keep_session,
                    **self._connect_kwargs,
                )
            return self._pool

    async def send(
        self,
        channels: Sequence[str],
        payloads: Sequence[str],
        connection: AsyncConnection | None = None,
    ) -> None:
        """NOTIFY ``payloads[i]`` on ``channels[i]``, in order, in one statement.

        :raises PublishError: when it failed; through the pool, after the retries.
        """
        if self._memory is not None:
            if connection is not None:
                self._check_connection(connection)
            self._memory.notify(channels, payloads)
            return
        query, args = notify(channels, payloads)
        if connection is not None:  # the caller's transaction: never retried
            try:
                await executor(connection).execute(query, *args)
            except DriverError as exc:
                raise PublishError(f"NOTIFY failed: {exc}") from exc
            return
        await self._send_pooled(query, args)

    async def _send_pooled(self, query: str, args: tuple[object, ...]) -> None:
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            error = await self._attempt(query, args, deadline, attempt)
            if error is None:
                self._failures = 0
                return
            attempt += 1
            delay = self._backoff(attempt, error) if attempt <= self._retries else None
            if delay is None or time.monotonic() + delay >= deadline:
                raise self._failed("NOTIFY failed", attempt - 1, error) from error
            self.retried += 1
            if self._pool is not None:  # connections opened before a restart are all dead
                await self._pool.expire_connections()
            self._log_retry(attempt, error)
            await asyncio.sleep(delay)

    async def _attempt(
        self, query: str, args: tuple[object, ...], deadline: float, attempt: int
    ) -> BaseException | None:
        """Send once: ``None`` when sent, the error when a fresh connection may work.

        :raises PublishError: when retrying cannot help, or the deadline passed.
        """
        scope = asyncio.timeout(max(0.0, deadline - time.monotonic()))
        pool: asyncpg.Pool | None = None
        conn: Any = None
        done = False
        try:
            pool = await self.pool()
            async with scope:
                conn = await pool.acquire()
                await conn.execute(query, *args)
            done = True
        except TimeoutError as exc:
            if scope.expired():
                # The statement may have run (only its answer is missing): not resent.
                raise self._failed(
                    f"NOTIFY did not complete within {self._timeout:g} s", attempt, exc
                ) from exc
            return exc  # connecting timed out: safe to retry
        except ConfigError:  # no database configured: the bus's own error, as it is
            raise
        except (asyncpg.ClientConfigurationError, ValueError) as exc:  # a bad DSN: final
            raise PublishError(f"cannot publish: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            return exc
        except DRIVER_ERRORS as exc:  # the statement itself failed: not retried
            raise PublishError(f"NOTIFY failed: {exc}") from exc
        finally:
            if pool is not None and conn is not None:
                await self._release(pool, conn, broken=not done)
        return None

    async def _release(self, pool: asyncpg.Pool, conn: Any, *, broken: bool) -> None:
        """Give ``conn`` back; a connection in an unknown state is closed first."""
        # A connection the pool saw die is already detached from its proxy: the
        # InterfaceError says so, and there is nothing left to close.
        if broken:
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
        try:
            await pool.release(conn, timeout=self._connect_timeout)
        except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError):
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    def _failed(self, what: str, retries: int, exc: BaseException) -> PublishError:
        self._failures += 1
        detail = str(exc) or type(exc).__name__
        level = logging.WARNING if self._failures & (self._failures - 1) == 0 else logging.DEBUG
        logger.log(level, "publish to %s failed: %s", redact_dsn(self._dsn()), detail)
        suffix = f" after {retries} retries" if retries else ""
        return PublishError(f"{what}{suffix}: {detail}")

    def _log_retry(self, attempt: int, error: BaseException) -> None:
        level = logging.INFO if self.retried & (self.retried - 1) == 0 else logging.DEBUG
        logger.log(level, "publish retry %d on a fresh connection after: %s", attempt, error)

    async def close(self) -> None:
        """Close the pool, if one was opened."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except (TimeoutError, *CONNECTION_ERRORS):
                pool.terminate()
