"""pgbus.testing (wait_for, RecordingPlugin) and the pytest plugin's pgbus_* fixtures."""

from __future__ import annotations

import asyncio
import importlib.metadata
import textwrap

import asyncpg
import pytest

import pgbus
from pgbus.testing import RecordingPlugin, wait_for

pytest_plugins = ["pytester"]


@pytest.fixture
def events(channel: str) -> tuple[type[pgbus.Event], type[pgbus.Event]]:
    class OrderPlaced(pgbus.Event, channel=channel):
        order_id: int

    class OrderShipped(pgbus.Event, channel=channel):
        order_id: int

    return OrderPlaced, OrderShipped


# -- wait_for ----------------------------------------------------------------------------


async def test_wait_for_as_context_manager_catches_the_event(make_bus, events) -> None:
    """`async with wait_for(...)` listens first, then waits on exit for the event."""
    order_placed, _ = events
    bus = make_bus()
    async with bus:
        async with wait_for(bus, order_placed, timeout=5) as placed:
            await bus.publish(order_placed(order_id=7))
        assert placed.event == order_placed(order_id=7)
        assert not [s for s in bus.subscriptions if s.name.startswith("pgbus.testing")]


async def test_wait_for_where_skips_other_events(make_bus, events) -> None:
    """`where=` makes wait_for ignore events it does not accept."""
    order_placed, _ = events
    bus = make_bus()
    async with bus:
        async with wait_for(bus, order_placed, where=lambda e: e.order_id == 2) as placed:
            await bus.publish_many([order_placed(order_id=1), order_placed(order_id=2)])
        assert placed.event.order_id == 2


async def test_wait_for_awaited_gets_an_event_caused_by_a_handler(make_bus, events) -> None:
    """`await wait_for(...)` returns the event another handler published meanwhile."""
    order_placed, order_shipped = events
    bus = make_bus()

    @bus.subscribe(order_placed)
    async def ship(event: pgbus.Event) -> None:
        await bus.publish(order_shipped(order_id=event.order_id))  # type: ignore[attr-defined]

    async with bus:
        waiter = wait_for(bus, order_shipped)
        await waiter.start()
        await bus.publish(order_placed(order_id=3))
        shipped = await waiter
    assert shipped == order_shipped(order_id=3)


async def test_wait_for_times_out_with_a_clear_message(make_bus, events, channel: str) -> None:
    """wait_for raises TimeoutError naming the event type and channel when none comes."""
    order_placed, _ = events
    bus = make_bus()
    async with bus:
        with pytest.raises(TimeoutError, match=f"no OrderPlaced arrived on '{channel}' within"):
            await wait_for(bus, order_placed, timeout=0.2)
        waiter = wait_for(bus, order_placed)
        with pytest.raises(RuntimeError, match="has arrived"):
            _ = waiter.event


# -- RecordingPlugin ---------------------------------------------------------------------


async def test_recording_plugin_records_published_handled_and_failed(make_bus, events) -> None:
    """The recorder keeps what was published, handled and failed, and waits for handlers."""
    order_placed, _ = events
    recorder = RecordingPlugin()
    bus = make_bus(plugins=[recorder])

    @bus.subscribe(order_placed, retry=pgbus.Retry(attempts=1))
    async def handle(event: pgbus.Event) -> None:
        if event.order_id == 2:  # type: ignore[attr-defined]
            raise ValueError("no")

    async with bus:
        await bus.publish_many([order_placed(order_id=1), order_placed(order_id=2)])
        await recorder.wait_handled(order_placed, count=2)
        (failure,) = await recorder.wait_handled(ok=False)
    assert recorder.published_events == [order_placed(order_id=1), order_placed(order_id=2)]
    assert recorder.handled_events == [order_placed(order_id=1)]
    assert failure.event == order_placed(order_id=2)
    assert isinstance(failure.error, ValueError)
    assert recorder.failures == [failure]
    assert len(recorder.received) == 2
    recorder.clear()
    assert recorder.handled == []


async def test_recording_plugin_wait_handled_times_out(make_bus, events) -> None:
    """wait_handled raises TimeoutError saying how many of how many were handled."""
    order_placed, _ = events
    recorder = RecordingPlugin()
    bus = make_bus(plugins=[recorder])
    async with bus:
        with pytest.raises(TimeoutError, match="0 of 1 OrderPlaced handled"):
            await recorder.wait_handled(order_placed, timeout=0.1)


async def test_recording_plugin_records_decode_errors(make_bus, events, channel: str) -> None:
    """A payload no model accepts is recorded with its error."""
    order_placed, _ = events
    recorder = RecordingPlugin()
    bus = make_bus(plugins=[recorder])
    bus.subscribe(order_placed)(lambda _e: None)
    async with bus:
        await bus.notify(channel, '{"order_id": "x"}')
        async with wait_for(bus, order_placed):
            await bus.publish(order_placed(order_id=1))
    ((message, error),) = recorder.decode_errors
    assert message.payload == '{"order_id": "x"}'
    assert isinstance(error, pgbus.DecodeError)


# -- the pytest plugin -------------------------------------------------------------------


def test_plugin_is_registered_through_pytest11() -> None:
    """pgbus registers its fixtures module in the pytest11 entry-point group."""
    found = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "pgbus"]
    if not found:
        pytest.skip("pgbus is not installed (pip install -e .); the entry point needs it")
    assert found[0].value == "pgbus.pytest_plugin"


def _plugin_args() -> list[str]:
    installed = any(ep.name == "pgbus" for ep in importlib.metadata.entry_points(group="pytest11"))
    return ["-p", "no:cacheprovider"] + ([] if installed else ["-p", "pgbus.pytest_plugin"])


USER_TESTS = """
    import pgbus
    from pgbus.testing import wait_for


    def make_events(channel):
        class OrderPlaced(pgbus.Event, channel=channel):
            order_id: int

        class OrderShipped(pgbus.Event, channel=channel):
            order_id: int

        return OrderPlaced, OrderShipped


    async def test_handler_ships_orders(pgbus_bus, pgbus_channel, pgbus_recorder):
        OrderPlaced, OrderShipped = make_events(pgbus_channel)

        async def ship(event):
            await pgbus_bus.publish(OrderShipped(order_id=event.order_id))

        await pgbus_bus.listen(OrderPlaced, ship)
        async with wait_for(pgbus_bus, OrderShipped, timeout=5) as shipped:
            await pgbus_bus.publish(OrderPlaced(order_id=1))
        assert shipped.event.order_id == 1
        await pgbus_recorder.wait_handled(OrderPlaced)


    def test_dsn_is_a_database_of_its_own(pgbus_dsn, pgbus_server_dsn):
        assert pgbus_dsn != pgbus_server_dsn
        assert "/pgbus_test_" in pgbus_dsn
        print("DATABASE=" + pgbus_dsn.rsplit("/", 1)[1])
"""


async def test_fixtures_test_a_handler_against_real_postgres(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's suite gets a database of its own (dropped at the end), a Bus and wait_for."""
    monkeypatch.setenv("PGBUS_TEST_DSN", pg_dsn)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makepyfile(test_user=textwrap.dedent(USER_TESTS))
    result = await asyncio.to_thread(pytester.runpytest_subprocess, "-s", *_plugin_args())
    result.assert_outcomes(passed=2)
    line = next(line for line in result.outlines if "DATABASE=" in line)
    database = line.split("DATABASE=", 1)[1].split()[0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        exists = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    assert database.startswith("pgbus_test_")
    assert exists == 0


def test_bus_options_fixture_can_be_overridden(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overriding pgbus_bus_options configures the Bus the pgbus_bus fixture builds."""
    monkeypatch.setenv("PGBUS_TEST_DSN", pg_dsn)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def pgbus_bus_options():\n"
        "    return {'load_entrypoints': False, 'disable_plugins': ['metrics']}\n"
    )
    pytester.makepyfile(
        test_opts="async def test_no_metrics(pgbus_bus):\n"
        "    assert pgbus_bus.plugins.get('metrics') is None\n"
        "    assert pgbus_bus.state.value == 'running'\n"
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1)


def test_fixtures_are_listed_and_can_be_turned_off(pytester: pytest.Pytester) -> None:
    """`pytest --fixtures` lists the pgbus_* fixtures; `-p no:pgbus` removes them."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    listed = pytester.runpytest_subprocess("--fixtures", *_plugin_args())
    for name in ("pgbus_bus", "pgbus_dsn", "pgbus_channel", "pgbus_recorder"):
        assert any(line.startswith(name) for line in listed.outlines), name
    if "pgbus.pytest_plugin" in _plugin_args():
        return  # not installed: there is no entry point to turn off
    off = pytester.runpytest_subprocess("--fixtures", "-p", "no:pgbus")
    assert not any(line.startswith("pgbus_bus") for line in off.outlines)


MODULE_LEVEL_BUS = """
    import pgbus

    bus = pgbus.Bus(load_entrypoints=False)  # at import time, as the docs show


    async def test_the_module_level_bus_uses_the_test_database(pgbus_dsn):
        async with bus:
            assert bus.dsn == pgbus_dsn
            assert bus.ready
"""


def test_pgbus_env_points_a_module_level_bus_at_the_test_database(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ini line (usefixtures = pgbus_env) makes an import-time Bus() use the test database."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        f"pgbus_test_dsn = {pg_dsn}\nusefixtures = pgbus_env\n"
    )
    pytester.makepyfile(test_app=textwrap.dedent(MODULE_LEVEL_BUS))
    monkeypatch.delenv("PGBUS_TEST_DSN", raising=False)
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1)
    assert any("(the pgbus_test_dsn ini option)" in line for line in result.outlines)


def test_a_wrong_test_dsn_is_one_error_naming_the_variable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable $PGBUS_TEST_DSN stops the session with one line naming it, not per test."""
    monkeypatch.setenv("PGBUS_TEST_DSN", "postgresql://u:secret@127.0.0.1:1/db")
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(
        test_many="import pytest\n\n"
        "@pytest.mark.parametrize('n', range(3))\n"
        "def test_n(pgbus_dsn, n):\n"
        "    pass\n"
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.outlines + result.errlines if "cannot use" in line]
    assert len(errors) == 1
    assert "pgbus: cannot use $PGBUS_TEST_DSN (postgresql://u:***@127.0.0.1:1/db)" in errors[0]
    assert "secret" not in result.stdout.str() + result.stderr.str()


def test_without_a_named_server_the_plugin_starts_a_throwaway_one(
    pytester: pytest.Pytester, pg_cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no PGBUS_TEST_DSN nor ini option, a throwaway cluster is used, and it says so."""
    monkeypatch.delenv("PGBUS_TEST_DSN", raising=False)
    monkeypatch.setenv("PGBUS_PG_BINDIR", str(pg_cluster.bindir))
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(
        test_where="def test_where(pgbus_server_dsn):\n"
        "    assert ':5432/' not in pgbus_server_dsn\n"
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1)
    said = [line for line in result.outlines if "pgbus: a throwaway cluster (PostgreSQL" in line]
    assert said, result.outlines
    assert f"binaries in {pg_cluster.bindir}" in said[0]  # which PostgreSQL it ran
