"""tests/_proxy.py: the fault-injecting TCP proxy in front of a real server."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import asyncpg
import pytest

if TYPE_CHECKING:
    from _proxy import TcpProxy


async def test_proxy_forwards_queries(tcp_proxy: TcpProxy, pg_dsn: str) -> None:
    """Queries through the proxy get the server's answers, and each client is one pair."""
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    try:
        assert await conn.fetchval("SELECT 40 + 2", timeout=5) == 42
        assert tcp_proxy.connections == 1
    finally:
        await conn.close(timeout=5)
    await asyncio.wait_for(tcp_proxy.wait_idle(), 5)


async def test_proxy_forwards_notifications(tcp_proxy: TcpProxy, pg_dsn: str, channel: str) -> None:
    """LISTEN through the proxy receives a NOTIFY sent directly to the server."""
    listener = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    sender = await asyncpg.connect(pg_dsn, timeout=5)
    try:
        received: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener(channel, lambda *args: received.put_nowait(args[3]))
        await sender.execute("SELECT pg_notify($1, 'ping')", channel)
        assert await asyncio.wait_for(received.get(), 5) == "ping"
    finally:
        await listener.close(timeout=5)
        await sender.close(timeout=5)


@pytest.mark.parametrize("rst", [True, False])
async def test_cut_fires_the_termination_listener(
    tcp_proxy: TcpProxy, pg_dsn: str, rst: bool
) -> None:
    """cut() drops every live connection, and asyncpg notices at once."""
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _c: lost.done() or lost.set_result(None))
    try:
        await conn.fetchval("SELECT 1", timeout=5)
        tcp_proxy.cut(rst=rst)
        await asyncio.wait_for(lost, 2)
        assert conn.is_closed()
    finally:
        conn.terminate()
    await asyncio.wait_for(tcp_proxy.wait_idle(), 5)


async def test_blackhole_makes_queries_time_out(tcp_proxy: TcpProxy, pg_dsn: str) -> None:
    """A blackholed connection stays open but a query with a timeout raises TimeoutError."""
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    try:
        tcp_proxy.blackhole = True
        begin = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.5)
        assert 0.45 < time.monotonic() - begin < 2.0
        assert tcp_proxy.connections == 1
    finally:
        conn.terminate()


async def test_refuse_makes_connect_fail_fast(tcp_proxy: TcpProxy, pg_dsn: str) -> None:
    """With refuse set, new connections are closed at once and connect fails quickly."""
    tcp_proxy.refuse = True
    begin = time.monotonic()
    with pytest.raises((OSError, asyncpg.InterfaceError)):
        await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    assert time.monotonic() - begin < 1.0
    tcp_proxy.refuse = False
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    await conn.close(timeout=5)


async def test_latency_delays_each_chunk(tcp_proxy: TcpProxy, pg_dsn: str) -> None:
    """latency delays a query's round trip by at least one delay per direction."""
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn), timeout=5)
    try:
        tcp_proxy.latency = 0.1
        begin = time.monotonic()
        assert await conn.fetchval("SELECT 1", timeout=5) == 1
        assert time.monotonic() - begin >= 0.2
    finally:
        tcp_proxy.latency = 0.0
        await conn.close(timeout=5)


def test_dsn_for_keeps_everything_but_the_address(tcp_proxy: TcpProxy) -> None:
    """dsn_for() swaps host and port and keeps user, password, database and options."""
    rewritten = tcp_proxy.dsn_for("postgresql://u:p@db.example:6543/app?sslmode=disable&port=1")
    assert rewritten == f"postgresql://u:p@127.0.0.1:{tcp_proxy.port}/app?sslmode=disable"
    assert tcp_proxy.dsn_for("postgresql://h/db") == f"postgresql://127.0.0.1:{tcp_proxy.port}/db"
