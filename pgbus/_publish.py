"""The publisher: NOTIFY through a pool (never the LISTEN connection), or the caller's.

One event is ``SELECT pg_notify($1, $2)``; many are one statement,
``SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[])``, so a batch costs one
round trip and is atomic. Payload sizes are checked before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from pgbus._channels import MAX_PAYLOAD_BYTES
from pgbus._util import redact_dsn
from pgbus.errors import PayloadTooLarge, PublishError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

NOTIFY_ONE = "SELECT pg_notify($1, $2)"
NOTIFY_MANY = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)"

#: What the driver raises when a statement or a connection fails.
DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

#: What a connection accepted by ``publish(..., connection=…)`` must offer.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def check_size(channel: str, payload: str) -> None:
    """Raise :class:`PayloadTooLarge` when NOTIFY would refuse ``payload``."""
    # Characters bound bytes from below and 4x from above: encode only when it matters.
    if len(payload) * 4 < MAX_PAYLOAD_BYTES:
        return
    size = len(payload.encode())
    if size >= MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(channel, size, MAX_PAYLOAD_BYTES - 1)


class Publisher:
    """Sends NOTIFYs through a lazily created pool of its own."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float,
        pool_max_size: int,
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._pool_max_size = pool_max_size
        self._connect_kwargs = dict(connect_kwargs)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is not None:
            return pool
        async with self._pool_lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_max_size,
                        timeout=self._connect_timeout,
                        **self._connect_kwargs,
                    )
                except DRIVER_ERRORS as exc:
                    raise PublishError(
                        f"cannot connect the publisher to {redact_dsn(self._dsn)}: {exc}"
                    ) from exc
            return self._pool

    async def send(
        self,
        channels: Sequence[str],
        payloads: Sequence[str],
        connection: Connection | None = None,
    ) -> None:
        """NOTIFY ``payloads[i]`` on ``channels[i]``, in order, in one statement."""
        args: tuple[object, object]
        if len(payloads) == 1:
            query, args = NOTIFY_ONE, (channels[0], payloads[0])
        else:
            query, args = NOTIFY_MANY, (list(channels), list(payloads))
        try:
            if connection is not None:
                await connection.execute(query, *args)
                return
            pool = await self._get_pool()
            await pool.execute(query, *args)
        except DRIVER_ERRORS as exc:
            raise PublishError(f"NOTIFY failed: {exc}") from exc

    async def close(self) -> None:
        """Close the pool, if one was opened."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
