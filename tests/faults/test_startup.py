"""Fault 4: the database is unreachable when the bus starts, and reachable later."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from _faults import Receiver

import pgbus

if TYPE_CHECKING:
    from _proxy import TcpProxy

    from pgbus.server import TempCluster


class Attempts:
    """A backoff strategy that signals each retry and waits a fixed 50 ms."""

    def __init__(self) -> None:
        self.attempts: list[int] = []
        self.retrying = asyncio.Event()

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float:
        self.attempts.append(attempt)
        self.retrying.set()
        return 0.05


async def test_start_waits_for_a_refusing_database(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """start() keeps trying while connections are refused and returns once they are accepted."""
    attempts = Attempts()
    receiver = Receiver(proxy.dsn_for(cluster.dsn), channel, plugins=[attempts])
    proxy.refuse = True
    start = asyncio.create_task(receiver.bus.start())
    try:
        await asyncio.wait_for(attempts.retrying.wait(), 10)
        assert not start.done()
        proxy.refuse = False
        await asyncio.wait_for(start, 10)
        await receiver.bus.notify(channel, "up")
        await receiver.marker("up")
        assert receiver.bus.ready
        assert attempts.attempts[0] == 1
    finally:
        await receiver.bus.stop()


@pytest.mark.restarts_server
async def test_start_waits_for_a_stopped_server(cluster: TempCluster, channel: str) -> None:
    """start() against a stopped server succeeds once the server is started."""
    attempts = Attempts()
    receiver = Receiver(cluster.dsn, channel, plugins=[attempts])
    cluster.stop("fast")
    try:
        start = asyncio.create_task(receiver.bus.start())
        await asyncio.wait_for(attempts.retrying.wait(), 10)
    finally:
        cluster.start()  # in this (the main) thread: see pgbus.server on PDEATHSIG
    try:
        await asyncio.wait_for(start, 10)
        await receiver.bus.notify(channel, "up")
        await receiver.marker("up")
    finally:
        await receiver.bus.stop()


async def test_start_timeout_bounds_the_wait(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """With nothing reachable, start() fails with ListenerError after start_timeout."""
    proxy.refuse = True
    receiver = Receiver(proxy.dsn_for(cluster.dsn), channel, start_timeout=0.3)
    with pytest.raises(pgbus.ListenerError, match="could not connect"):
        await asyncio.wait_for(receiver.bus.start(), 10)
    assert receiver.bus.state is pgbus.BusState.STOPPED


async def test_start_through_a_blackhole_is_bounded(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """A connect that hangs (blackhole) is bounded by connect_timeout, then start_timeout."""
    proxy.blackhole = True
    receiver = Receiver(proxy.dsn_for(cluster.dsn), channel, connect_timeout=0.2, start_timeout=0.5)
    with pytest.raises(pgbus.ListenerError, match="could not connect"):
        await asyncio.wait_for(receiver.bus.start(), 10)
