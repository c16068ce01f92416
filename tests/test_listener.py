"""The listener connection: keepalive, health checks, status, resync and giving up."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import asyncpg
import pytest

import pgbus
from pgbus._listener import HEALTH_QUERY, set_keepalive

if TYPE_CHECKING:
    from collections.abc import Callable

    from _proxy import TcpProxy
    from conftest import Recorder


class ConnectEvents:
    """Puts each (re)connect and terminal error into queues, for bounded waits."""

    def __init__(self) -> None:
        self.connects: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()
        self.resyncs: asyncio.Queue[tuple[float, float]] = asyncio.Queue()
        self.terminal: asyncio.Queue[BaseException] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_connect(self, bus: pgbus.Bus, channels: tuple[str, ...]) -> None:
        self.connects.put_nowait(tuple(channels))

    @pgbus.hookimpl
    def pgbus_on_resync(
        self,
        bus: pgbus.Bus,
        channels: tuple[str, ...],
        disconnected_at: float,
        reconnected_at: float,
    ) -> None:
        self.resyncs.put_nowait((disconnected_at, reconnected_at))

    @pgbus.hookimpl
    def pgbus_on_terminal_error(self, bus: pgbus.Bus, error: BaseException) -> None:
        self.terminal.put_nowait(error)


async def terminate_listener(pg_conn: asyncpg.Connection, bus: pgbus.Bus) -> None:
    assert await pg_conn.fetchval("SELECT pg_terminate_backend($1)", bus.listener_pid)


async def test_keepalive_and_user_timeout_are_set_on_the_listener_socket(
    make_bus: Callable[..., pgbus.Bus], channel: str, recorder: Recorder
) -> None:
    """The listener's TCP socket has keepalive and TCP_USER_TIMEOUT from the health options."""
    bus = make_bus(health_check_interval=4.0, health_check_timeout=2.0)
    bus.subscribe(channel)(recorder)
    await bus.start()
    conn = bus._listener._conn
    sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        pytest.skip("the test server is on a Unix socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
    assert set_keepalive(conn, 4.0, 2.0)  # type: ignore[arg-type]


async def test_health_query_lists_the_listened_channels(
    make_bus: Callable[..., pgbus.Bus], channel: str, recorder: Recorder
) -> None:
    """The health check's query returns the channels the connection really LISTENs to."""
    bus = make_bus()
    bus.subscribe(channel)(recorder)
    await bus.start()
    assert bus._listener._conn is not None
    assert await bus._listener._conn.fetchval(HEALTH_QUERY) == [channel]


async def test_health_check_reconnects_when_listen_was_lost(
    make_bus: Callable[..., pgbus.Bus], channel: str, recorder: Recorder
) -> None:
    """A connection that silently stopped LISTENing is replaced, and events flow again."""
    events = ConnectEvents()
    bus = make_bus(plugins=[events], health_check_interval=0.1, health_check_timeout=2.0)
    bus.subscribe(channel)(recorder)
    await bus.start()
    await asyncio.wait_for(events.connects.get(), 5)
    assert bus._listener._conn is not None
    await bus._listener._conn.execute("UNLISTEN *")  # what a pooling proxy may do
    await asyncio.wait_for(events.connects.get(), 5)
    assert bus.reconnects == 1
    assert "no longer LISTENs" in str(bus.status.last_error)
    await bus.notify(channel, "after")
    message = await recorder.next()
    assert isinstance(message, pgbus.Message)
    assert message.payload == "after"


async def test_status_and_readiness_follow_the_connection(
    make_bus: Callable[..., pgbus.Bus],
    channel: str,
    recorder: Recorder,
    pg_conn: asyncpg.Connection,
) -> None:
    """bus.status reports starting, connected, the reconnect with the server's reason, stopped."""
    events = ConnectEvents()
    bus = make_bus(plugins=[events])
    bus.subscribe(channel)(recorder)
    assert bus.status.state is pgbus.ListenerState.NOT_STARTED
    assert not bus.ready
    await bus.start()
    await asyncio.wait_for(events.connects.get(), 5)
    first = bus.status
    assert first.state is pgbus.ListenerState.CONNECTED
    assert first.ready
    assert bus.ready
    assert first.reconnects == 0
    assert first.channels == (channel,)
    await terminate_listener(pg_conn, bus)
    await asyncio.wait_for(events.connects.get(), 5)
    second = bus.status
    assert second.ready
    assert second.reconnects == 1
    assert second.since > first.since
    assert "FATAL terminating connection due to administrator command" in str(second.last_error)
    assert second.as_dict()["reconnects"] == 1
    assert second.as_dict()["state"] == "connected"
    await bus.stop()
    assert bus.status.state is pgbus.ListenerState.STOPPED
    assert not bus.ready
    assert not bus.status.as_dict()["ready"]


async def test_on_resync_runs_after_listen_and_holds_deliveries(
    make_bus: Callable[..., pgbus.Bus],
    channel: str,
    recorder: Recorder,
    pg_conn: asyncpg.Connection,
) -> None:
    """on_resync gets the gap; events arriving while it runs are kept and handled after it."""
    started: asyncio.Queue[pgbus.Gap] = asyncio.Queue()
    release = asyncio.Event()
    order: list[str] = []

    async def rebuild(gap: pgbus.Gap) -> None:
        started.put_nowait(gap)
        await release.wait()
        order.append("rebuilt")

    async def handler(message: pgbus.Message) -> None:
        order.append(message.payload)
        await recorder(message)

    bus = make_bus()
    bus.subscribe(channel, on_resync=rebuild)(handler)
    await bus.start()
    await terminate_listener(pg_conn, bus)
    gap = await asyncio.wait_for(started.get(), 5)
    assert gap.channels == (channel,)
    assert gap.duration >= 0
    await bus.notify(channel, "during")  # LISTEN is back: not lost, but held
    assert await recorder.nothing_more(0.3)
    release.set()
    message = await recorder.next()
    assert isinstance(message, pgbus.Message)
    assert message.payload == "during"
    assert order == ["rebuilt", "during"]


async def test_listen_takes_on_resync_while_running(
    make_bus: Callable[..., pgbus.Bus],
    channel: str,
    recorder: Recorder,
    pg_conn: asyncpg.Connection,
) -> None:
    """bus.listen(..., on_resync=) calls a plain function after a reconnect."""
    gaps: asyncio.Queue[pgbus.Gap] = asyncio.Queue()
    bus = make_bus()
    await bus.start()
    await bus.listen(channel, recorder, on_resync=gaps.put_nowait)
    await terminate_listener(pg_conn, bus)
    gap = await asyncio.wait_for(gaps.get(), 5)
    assert gap.channels == (channel,)
    await bus.notify(channel, "x")
    message = await recorder.next()
    assert isinstance(message, pgbus.Message)


async def test_hook_pgbus_on_terminal_error(
    make_bus: Callable[..., pgbus.Bus],
    tcp_proxy: TcpProxy,
    pg_dsn: str,
    channel: str,
    recorder: Recorder,
) -> None:
    """When the backoff gives up: the hook gets the error, status is failed, wait_closed raises."""
    events = ConnectEvents()
    bus = make_bus(
        tcp_proxy.dsn_for(pg_dsn),
        plugins=[events, pgbus.ExponentialBackoff(base=0.01, cap=0.01, max_attempts=2)],
        disable_plugins=["backoff"],
    )
    bus.subscribe(channel)(recorder)
    await bus.start()
    tcp_proxy.refuse = True
    tcp_proxy.cut()
    error = await asyncio.wait_for(events.terminal.get(), 10)
    assert isinstance(error, pgbus.ListenerError)
    assert "gave up reconnecting" in str(error)
    assert error.__cause__ is not None
    assert bus.status.state is pgbus.ListenerState.FAILED
    assert not bus.ready
    with pytest.raises(pgbus.ListenerError, match="gave up"):
        await asyncio.wait_for(bus.wait_closed(), 5)
    assert bus.state is pgbus.BusState.STOPPED


async def test_start_gives_up_within_start_timeout(
    make_bus: Callable[..., pgbus.Bus], tcp_proxy: TcpProxy, pg_dsn: str, channel: str
) -> None:
    """start() against an unreachable database fails with ListenerError after start_timeout."""
    tcp_proxy.refuse = True
    bus = make_bus(tcp_proxy.dsn_for(pg_dsn), start_timeout=0.5)
    bus.subscribe(channel)(lambda _m: None)
    with pytest.raises(pgbus.ListenerError, match=r"within 0\.5 s"):
        await asyncio.wait_for(bus.start(), 10)
    assert bus.state is pgbus.BusState.STOPPED


def test_exponential_backoff_is_capped_full_jitter() -> None:
    """Each delay is in [0, min(cap, base * 2**(n-1))], and the ceiling is reached."""
    backoff = pgbus.ExponentialBackoff(base=0.1, cap=1.0)
    for attempt in range(1, 40):
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
    assert max(backoff.delay(20) or 0 for _ in range(200)) > 0.5  # jitter spans the range


def test_exponential_backoff_gives_up_after_max_attempts() -> None:
    """With max_attempts=3 the fourth attempt gets None (give up)."""
    backoff = pgbus.ExponentialBackoff(max_attempts=3)
    assert [backoff.delay(n) is None for n in (1, 2, 3, 4)] == [False, False, False, True]
    assert backoff.pgbus_reconnect_backoff(4, None) is None


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": 2.0, "cap": 1.0}, {"max_attempts": 0}])
def test_exponential_backoff_refuses_bad_settings(kwargs: dict[str, float]) -> None:
    """A non-positive base, a cap below base or max_attempts < 1 is a ConfigError."""
    with pytest.raises(pgbus.ConfigError):
        pgbus.ExponentialBackoff(**kwargs)  # type: ignore[arg-type]


class DropsListenerOnConnect:
    """Terminates the listener's backend as soon as it connects, ``times`` times."""

    def __init__(self, pg_dsn: str, times: int) -> None:
        self.pg_dsn = pg_dsn
        self.times = times
        self.attempts: list[int] = []
        self.settled = asyncio.Event()

    @pgbus.hookimpl
    async def pgbus_on_connect(self, bus: pgbus.Bus) -> None:
        if self.times == 0:
            self.settled.set()
            return
        self.times -= 1
        conn = await asyncpg.connect(self.pg_dsn)
        try:
            await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", bus.listener_pid)
        finally:
            await conn.close()

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self, attempt: int) -> float:
        self.attempts.append(attempt)
        return 0.01


async def test_a_connection_dropped_at_once_counts_as_a_failed_attempt(
    make_bus: Callable[..., pgbus.Bus], pg_dsn: str, channel: str, recorder: Recorder
) -> None:
    """A listener dropped right after each connect gets growing attempts, not a tight loop."""
    plugin = DropsListenerOnConnect(pg_dsn, times=4)
    bus = make_bus(plugins=[plugin], health_check_interval=5.0)
    bus.subscribe(channel)(recorder)
    await bus.start()
    await asyncio.wait_for(plugin.settled.wait(), 10)
    assert plugin.attempts == [1, 2, 3, 4]
    await bus.notify(channel, "settled")
    assert getattr(await recorder.next(), "payload", None) == "settled"


async def test_health_check_does_not_reconnect_a_listener_behind_a_flood(
    make_bus, channel, pg_conn
):
    """A health-check answer queued behind a burst of notifications is not a dead connection."""
    total = 60_000
    count = 0
    all_in = asyncio.Event()
    bus = make_bus(health_check_interval=0.05, health_check_timeout=0.05)

    @bus.subscribe(channel)
    async def count_it(msg: pgbus.Message) -> None:
        nonlocal count
        count += 1
        if count == total:
            all_in.set()

    async with bus:
        # One statement, one commit: every notification lands in the socket at once.
        await pg_conn.execute(
            "SELECT pg_notify($1, g::text) FROM generate_series(1, $2) AS g", channel, total
        )
        await asyncio.wait_for(all_in.wait(), 120)
        assert bus.reconnects == 0
    assert count == total


async def test_reading_pauses_while_handlers_are_behind(make_bus, channel, pg_conn):
    """A flood into a stuck subscription pauses the socket: memory stays bounded, none lost."""
    from pgbus._listener import INBOUND_HIGH_WATER

    total = 3 * INBOUND_HIGH_WATER
    seen: list[int] = []
    release = asyncio.Event()
    paused = asyncio.Event()
    all_in = asyncio.Event()
    bus = make_bus(health_check_interval=0.05, health_check_timeout=0.2)
    pause = bus._listener.pause_reading

    def pause_and_tell() -> None:
        pause()
        paused.set()

    bus._listener.pause_reading = pause_and_tell  # type: ignore[method-assign]

    @bus.subscribe(channel, max_pending=100)
    async def stuck(msg: pgbus.Message) -> None:
        await asyncio.wait_for(release.wait(), 60)
        seen.append(int(msg.payload))
        if len(seen) == total:
            all_in.set()

    async with bus:
        await pg_conn.execute(
            "SELECT pg_notify($1, g::text) FROM generate_series(1, $2) AS g", channel, total
        )
        await asyncio.wait_for(paused.wait(), 30)
        held = len(bus._dispatch.inbound) + bus.subscriptions[0].pending  # pending: queue + backlog
        assert INBOUND_HIGH_WATER <= held < total  # PostgreSQL keeps the rest
        release.set()
        await asyncio.wait_for(all_in.wait(), 120)
        assert bus.reconnects == 0
        assert not bus._listener.paused
    assert seen == list(range(1, total + 1))


class OwnConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class of the user's own: the listener then uses add_listener callbacks."""


@pytest.mark.parametrize("own_class", [False, True], ids=["direct", "add_listener"])
async def test_notifications_reach_handlers_by_either_path(
    make_bus, recorder: Recorder, channel: str, pg_conn: asyncpg.Connection, own_class: bool
) -> None:
    """Notifications come straight from asyncpg's protocol, or through its callbacks when
    the user passes a connection_class; both deliver every one, in order."""
    from pgbus._listener import DIRECT_NOTIFICATIONS, ListenConnection

    assert DIRECT_NOTIFICATIONS  # this asyncpg has the method ListenConnection overrides
    bus = make_bus(connect_kwargs={"connection_class": OwnConnection} if own_class else {})
    bus.subscribe(channel)(recorder)
    async with bus:
        conn = bus._listener._conn
        assert type(conn) is (OwnConnection if own_class else ListenConnection)
        await pg_conn.execute(
            "SELECT pg_notify($1, i::text) FROM generate_series(1, 3000) AS i", channel
        )
        received = await recorder.take(3000)
        assert [m.payload for m in received] == [str(i) for i in range(1, 3001)]
        assert bus._listener.notifications == 3000
