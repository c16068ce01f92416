"""A hot standby (``cannot execute LISTEN during recovery``): a clear error at start, backoff
(not a tight loop) while running, and ``target_session_attrs`` to pick the writable host."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncpg
import pytest
from _faults import Receiver
from _standby import start_standby, stop_standby

import pgbus
from pgbus.server import TempCluster

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def spare_cluster(pg_cluster: TempCluster) -> Iterator[TempCluster]:
    """A second throwaway cluster of the same binaries, to turn into a standby."""
    spare = TempCluster(pg_cluster.bindir, max_connections=50)
    spare.start()
    try:
        yield spare
    finally:
        spare.destroy()


@pytest.fixture
def spare(spare_cluster: TempCluster) -> TempCluster:
    """The spare cluster, running as a primary (a test may have left it a standby)."""
    if not spare_cluster.running:
        assert spare_cluster.data_dir is not None
        (spare_cluster.data_dir / "standby.signal").unlink(missing_ok=True)
        spare_cluster.start()
    return spare_cluster


class Errors:
    """A backoff strategy that records each error and signals after ``n`` of them."""

    def __init__(self, n: int) -> None:
        self.errors: list[BaseException | None] = []
        self.enough = asyncio.Event()
        self.n = n

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float:
        self.errors.append(error)
        if len(self.errors) >= self.n:
            self.enough.set()
        return min(0.05 * 2 ** (attempt - 1), 0.2)


async def test_start_against_a_hot_standby_fails_at_once(spare: TempCluster, channel: str) -> None:
    """start() on a standby raises a ListenerError naming the cause and the fix, at once."""
    proc = start_standby(spare)
    try:
        receiver = Receiver(spare.dsn, channel, start_timeout=60)
        with pytest.raises(pgbus.ListenerError, match="hot standby") as info:
            await asyncio.wait_for(receiver.bus.start(), 10)
        assert "target_session_attrs=read-write" in str(info.value)
        assert isinstance(info.value.__cause__, asyncpg.ReadOnlySQLTransactionError)
    finally:
        stop_standby(proc)


@pytest.mark.restarts_server
async def test_running_bus_backs_off_on_a_standby_until_promotion(
    spare: TempCluster, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When the server comes back as a standby the bus retries per the backoff, logging at a
    bounded rate, and re-LISTENs once it is promoted."""
    errors = Errors(n=12)
    receiver = Receiver(spare.dsn, channel, plugins=[errors])
    await receiver.bus.start()
    proc = None
    try:
        caplog.set_level(logging.DEBUG, logger="pgbus")
        proc = start_standby(spare)
        await asyncio.wait_for(errors.enough.wait(), 30)
        assert any(isinstance(e, asyncpg.ReadOnlySQLTransactionError) for e in errors.errors)
        assert receiver.bus.status.state is pgbus.ListenerState.RECONNECTING
        warnings = [
            r
            for r in caplog.records
            if r.name == "pgbus._listener" and r.levelno >= logging.WARNING
        ]
        assert len(warnings) <= 6  # 1 lost + attempts 1, 2, 4, 8 (of 12 or more)
        assert any("hot standby" in r.getMessage() for r in warnings)
        admin = await asyncpg.connect(spare.dsn)
        try:
            assert await admin.fetchval("SELECT pg_promote()")
        finally:
            await admin.close()
        await receiver.watch.connects(2)
        await receiver.bus.notify(channel, "promoted")
        await receiver.marker("promoted")
    finally:
        await receiver.bus.stop()
        if proc is not None:
            stop_standby(proc)


async def test_target_session_attrs_picks_the_writable_host(
    cluster: TempCluster, spare: TempCluster, channel: str
) -> None:
    """With both hosts in the DSN and target_session_attrs=read-write, the bus listens on the
    primary even though the standby is listed first."""
    proc = start_standby(spare)
    try:
        dsn = (
            f"postgresql://postgres@127.0.0.1:{spare.port},127.0.0.1:{cluster.port}"
            "/postgres?target_session_attrs=read-write"
        )
        receiver = Receiver(dsn, channel)
        async with receiver.bus:
            await receiver.bus.notify(channel, "up")
            await receiver.marker("up")
            conn = receiver.bus._listener._conn
            assert conn is not None
            assert conn._addr[1] == cluster.port  # type: ignore[attr-defined]
    finally:
        stop_standby(proc)
