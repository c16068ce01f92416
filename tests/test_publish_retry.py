"""Publishing survives a broken pool connection, and fails clearly (never hangs) when it must."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
import pytest

import pgbus

if TYPE_CHECKING:
    from collections.abc import Callable

    from _proxy import TcpProxy
    from conftest import Recorder


class Backoffs:
    """Records each call of the backoff hook and answers a fixed delay."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.calls: list[tuple[int, BaseException | None]] = []
        self.called = asyncio.Event()

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float:
        self.calls.append((attempt, error))
        self.called.set()
        return self.delay


async def test_publish_is_retried_on_a_fresh_connection_after_a_cut(
    make_bus: Callable[..., pgbus.Bus],
    tcp_proxy: TcpProxy,
    pg_dsn: str,
    channel: str,
    recorder: Recorder,
) -> None:
    """A NOTIFY whose pooled connection was cut is resent on a new one and arrives once."""
    receiver = make_bus()
    receiver.subscribe(channel)(recorder)
    await receiver.start()
    backoffs = Backoffs()
    publisher = make_bus(tcp_proxy.dsn_for(pg_dsn), pool_max_size=1, plugins=[backoffs])
    await publisher.notify(channel, "warm-up")  # the pool now holds one connection
    tcp_proxy.cut()  # the client does not know yet: its next statement fails
    await publisher.notify(channel, "after-cut")
    assert [getattr(m, "payload", None) for m in await recorder.take(2)] == [
        "warm-up",
        "after-cut",
    ]
    assert await recorder.nothing_more()
    assert publisher._publisher.retried == 1
    assert backoffs.calls[0][0] == 1
    assert isinstance(backoffs.calls[0][1], asyncpg.ConnectionDoesNotExistError)


async def test_publish_on_the_callers_connection_is_never_retried(
    make_bus: Callable[..., pgbus.Bus],
    tcp_proxy: TcpProxy,
    pg_dsn: str,
    channel: str,
) -> None:
    """publish(connection=...) fails with PublishError and is not resent: the caller owns it."""
    bus = make_bus(pg_dsn)
    conn = await asyncpg.connect(tcp_proxy.dsn_for(pg_dsn))
    try:
        transaction = conn.transaction()
        await transaction.start()
        tcp_proxy.cut()
        with pytest.raises(pgbus.PublishError, match="NOTIFY failed"):
            await bus.notify(channel, "x", connection=conn)
    finally:
        conn.terminate()
    assert bus._publisher.retried == 0


async def test_publish_while_the_database_is_down_fails_after_the_bound(
    make_bus: Callable[..., pgbus.Bus], tcp_proxy: TcpProxy, pg_dsn: str, channel: str
) -> None:
    """With the database refusing connections, publish raises PublishError after its retries."""
    backoffs = Backoffs()
    tcp_proxy.refuse = True
    bus = make_bus(tcp_proxy.dsn_for(pg_dsn), plugins=[backoffs], publish_retries=2)
    with pytest.raises(pgbus.PublishError, match="after 2 retries"):
        await asyncio.wait_for(bus.notify(channel, "x"), 10)
    assert [attempt for attempt, _ in backoffs.calls] == [1, 2]


async def test_publish_through_a_blackhole_fails_after_publish_timeout(
    make_bus: Callable[..., pgbus.Bus], tcp_proxy: TcpProxy, pg_dsn: str, channel: str
) -> None:
    """A half-open pool connection makes publish fail after publish_timeout, not hang."""
    bus = make_bus(tcp_proxy.dsn_for(pg_dsn), publish_timeout=0.5)
    await bus.notify(channel, "warm-up")
    tcp_proxy.blackhole = True
    with pytest.raises(pgbus.PublishError, match=r"did not complete within 0\.5 s"):
        await asyncio.wait_for(bus.notify(channel, "x"), 10)


async def test_publish_waits_for_the_database_to_come_back(
    make_bus: Callable[..., pgbus.Bus],
    tcp_proxy: TcpProxy,
    pg_dsn: str,
    channel: str,
    recorder: Recorder,
) -> None:
    """A publish made while connections are refused succeeds once they are accepted again."""
    receiver = make_bus()
    receiver.subscribe(channel)(recorder)
    await receiver.start()
    backoffs = Backoffs(delay=0.05)
    tcp_proxy.refuse = True
    bus = make_bus(tcp_proxy.dsn_for(pg_dsn), plugins=[backoffs], publish_retries=1000)
    publish = asyncio.create_task(bus.notify(channel, "late"))
    await asyncio.wait_for(backoffs.called.wait(), 5)
    tcp_proxy.refuse = False
    await asyncio.wait_for(publish, 10)
    message = await recorder.next()
    assert getattr(message, "payload", None) == "late"


async def test_publish_retries_zero_means_no_retry(
    make_bus: Callable[..., pgbus.Bus], tcp_proxy: TcpProxy, pg_dsn: str, channel: str
) -> None:
    """publish_retries=0 fails on the first broken connection without calling the backoff."""
    backoffs = Backoffs()
    tcp_proxy.refuse = True
    bus = make_bus(tcp_proxy.dsn_for(pg_dsn), plugins=[backoffs], publish_retries=0)
    with pytest.raises(pgbus.PublishError):
        await asyncio.wait_for(bus.notify(channel, "x"), 10)
    assert backoffs.calls == []


async def test_a_statement_error_is_not_retried(
    make_bus: Callable[..., pgbus.Bus], channel: str
) -> None:
    """An error of the statement itself (not of the connection) is reported at once."""
    backoffs = Backoffs()
    bus = make_bus(plugins=[backoffs])
    with pytest.raises(pgbus.PublishError):
        await bus._publisher.send(["x" * 64], ["payload"])  # channel name too long
    assert backoffs.calls == []
    await bus.notify(channel, "still works")


def test_publish_options_are_checked() -> None:
    """Bad publish_timeout and publish_retries are refused when the bus is created."""
    with pytest.raises(pgbus.ConfigError, match="publish_timeout"):
        pgbus.Bus("postgresql://x/y", load_entrypoints=False, publish_timeout=0)
    with pytest.raises(pgbus.ConfigError, match="publish_retries"):
        pgbus.Bus("postgresql://x/y", load_entrypoints=False, publish_retries=-1)
