"""What the relay's test modules share: an event type, the status and dead letters, ports."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

import asyncpg
from pgbus_relay import RelayStatus, relay_status

import pgbus

if TYPE_CHECKING:
    from collections.abc import Callable

TIMEOUT = 60.0


def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true``), where nothing they need may be missing."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def order_type(channel: str) -> type[pgbus.Event]:
    """An event type on ``channel`` with a key field, a sequence number and a filler."""

    class OrderPlaced(pgbus.Event, channel=channel):
        order_id: int
        seq: int = 0
        note: str = ""

    return OrderPlaced


async def status_rows(dsn: str, schema: str) -> list[RelayStatus]:
    """``pgbus relay status`` of ``schema``, as rows."""
    conn = await asyncpg.connect(dsn)
    try:
        return await relay_status(conn, schema)
    finally:
        await conn.close()


async def wait_for_status(
    dsn: str, schema: str, wanted: Callable[[RelayStatus], bool], timeout: float = TIMEOUT
) -> RelayStatus:
    """Wait until the (only) relay row satisfies ``wanted``; return it."""

    async def look() -> RelayStatus:
        while True:
            rows = await status_rows(dsn, schema)
            if rows and wanted(rows[0]):
                return rows[0]
            await asyncio.sleep(0.1)

    return await asyncio.wait_for(look(), timeout)


async def dead_letters(dsn: str, schema: str) -> list[asyncpg.Record]:
    """The stored dead letters of ``schema``: subscription, event id, error."""
    conn = await asyncpg.connect(dsn)
    try:
        query = f'SELECT subscription, event_id, error FROM "{schema}".dead_letters ORDER BY id'  # noqa: S608
        return list(await conn.fetch(query))
    finally:
        await conn.close()
