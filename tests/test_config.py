"""Where a bus finds its database: the argument, $PGBUS_DSN, libpq's environment and files."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

import pgbus
from pgbus._util import plural

if TYPE_CHECKING:
    from pathlib import Path

LIBPQ = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSSLMODE")


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No PGBUS_DSN, no libpq variables, and a home without service files."""
    for var in (*LIBPQ, "PGBUS_DSN", "PGSERVICEFILE", "PGSYSCONFDIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_nothing_configured_names_all_three_ways(bare_env: pytest.MonkeyPatch) -> None:
    """With no argument, no PGBUS_DSN and no libpq variable, one error names all three."""
    with pytest.raises(pgbus.ConfigError) as info:
        pgbus.resolve_dsn()
    message = str(info.value)
    assert "pass a DSN to Bus()" in message
    assert "PGBUS_DSN" in message
    assert "PGHOST" in message
    assert "PGSERVICE" in message


async def test_a_bus_built_at_import_time_resolves_at_start(bare_env, pg_dsn) -> None:
    """Bus() with nothing configured builds; start() raises ConfigError, or connects once set."""
    bus = pgbus.Bus(load_entrypoints=False)
    assert "not resolved" in repr(bus)
    assert bus.status.state is pgbus.ListenerState.NOT_STARTED
    with pytest.raises(pgbus.ConfigError, match="PGBUS_DSN"):
        await bus.start()
    assert bus.state is pgbus.BusState.NEW
    bare_env.setenv("PGBUS_DSN", pg_dsn)
    async with bus:
        assert bus.dsn == pg_dsn
        assert bus.ready


async def test_the_libpq_environment_names_the_database(bare_env, pg_dsn) -> None:
    """PGHOST, PGPORT, PGUSER and PGDATABASE are enough, as they are for psql."""
    parts = urlsplit(pg_dsn)
    bare_env.setenv("PGHOST", parts.hostname or "127.0.0.1")
    bare_env.setenv("PGPORT", str(parts.port or 5432))
    bare_env.setenv("PGUSER", parts.username or "postgres")
    bare_env.setenv("PGDATABASE", parts.path.lstrip("/") or "postgres")
    if parts.password:
        bare_env.setenv("PGPASSWORD", parts.password)
    async with pgbus.Bus(load_entrypoints=False) as bus:
        assert bus.ready
        assert urlsplit(bus.dsn).hostname == (parts.hostname or "127.0.0.1")


async def test_a_service_file_names_the_database(bare_env, pg_dsn, tmp_path) -> None:
    """A keyword DSN `service=name` is read from $PGSYSCONFDIR/pg_service.conf, as libpq does."""
    parts = urlsplit(pg_dsn)
    (tmp_path / "pg_service.conf").write_text(
        "[mysvc]\n"
        f"host={parts.hostname or '127.0.0.1'}\nport={parts.port or 5432}\n"
        f"user={parts.username or 'postgres'}\ndbname={parts.path.lstrip('/') or 'postgres'}\n"
        + (f"password={parts.password}\n" if parts.password else "")
    )
    bare_env.setenv("PGSYSCONFDIR", str(tmp_path))
    async with pgbus.Bus("service=mysvc", load_entrypoints=False) as bus:
        assert bus.ready
    bare_env.setenv("PGSERVICE", "mysvc")
    assert pgbus.resolve_dsn() == pgbus.Bus("service=mysvc").dsn


def test_keyword_dsns_become_urls(bare_env: pytest.MonkeyPatch) -> None:
    """libpq keyword DSNs, quoted values and socket directories included, become URLs."""
    resolve = pgbus.resolve_dsn
    assert resolve("postgresql://u@h/d") == "postgresql://u@h/d"
    assert (
        resolve("host=db port=5433 user=me password='p w\\'x' dbname=app sslmode=require")
        == "postgresql://me:p%20w%27x@db:5433/app?sslmode=require"
    )
    assert resolve("host=/run/postgresql dbname=x") == ("postgresql:///x?host=%2Frun%2Fpostgresql")
    with pytest.raises(pgbus.ConfigError, match="malformed keyword DSN"):
        resolve("host=db dbname")
    with pytest.raises(pgbus.ConfigError, match="service 'nope' is not defined"):
        resolve("service=nope")


def test_the_argument_wins_over_the_environment(bare_env: pytest.MonkeyPatch) -> None:
    """The DSN argument beats PGBUS_DSN, which beats the libpq variables."""
    bare_env.setenv("PGHOST", "from-libpq")
    assert pgbus.resolve_dsn() == "postgresql://from-libpq"
    bare_env.setenv("PGBUS_DSN", "postgresql://from-pgbus/db")
    assert pgbus.resolve_dsn() == "postgresql://from-pgbus/db"
    assert pgbus.resolve_dsn("postgresql://argument/db") == "postgresql://argument/db"


def test_get_bus_names_the_ways_to_configure(bare_env: pytest.MonkeyPatch) -> None:
    """pgbus.get_bus() with nothing configured raises one ConfigError saying what to set."""
    bare_env.setattr(pgbus._api, "_default", None)
    with pytest.raises(pgbus.ConfigError, match=r"pgbus\.configure\(dsn\).*PGBUS_DSN.*PGHOST"):
        pgbus.get_bus()


async def test_already_running_is_already_started(make_bus, channel) -> None:
    """Subscribing with the decorator or starting again while running raises AlreadyStarted."""
    bus = make_bus()
    bus.subscribe(channel)(_handler)
    async with bus:
        with pytest.raises(pgbus.AlreadyStarted, match="already running"):
            bus.subscribe(channel, name="late")(_handler)
        with pytest.raises(pgbus.AlreadyStarted):
            await bus.start()
    with pytest.raises(pgbus.BusClosed) as info:
        await bus.start()
    assert not isinstance(info.value, pgbus.AlreadyStarted)
    assert issubclass(pgbus.AlreadyStarted, pgbus.BusClosed)
    assert issubclass(pgbus.AlreadyStarted, pgbus.ConfigError)


def test_the_same_handler_twice_is_a_config_error(make_bus, channel) -> None:
    """The same handler on the same target twice is refused, unless named on purpose."""
    bus = make_bus()
    bus.subscribe(channel)(_handler)
    with pytest.raises(pgbus.ConfigError, match="already subscribed"):
        bus.subscribe(channel)(_handler)
    bus.subscribe(channel, name="again")(_handler)
    bus.subscribe(f"{channel}_other")(_handler)
    assert len(bus.subscriptions) == 3


def test_plural() -> None:
    """plural() writes '1 channel' and '2 channels'."""
    assert plural(1, "channel") == "1 channel"
    assert plural(2, "channel") == "2 channels"
    assert plural(0, "entry", "entries") == "0 entries"


async def _handler(_: object) -> None:
    """A handler that does nothing."""


async def test_the_dsn_can_be_named_before_start(bare_env, pg_dsn) -> None:
    """bus.dsn = ... names the database of a bus built without one; once started it cannot."""
    bus = pgbus.Bus(load_entrypoints=False)
    bus.dsn = pg_dsn
    async with bus:
        assert bus.ready
        with pytest.raises(pgbus.AlreadyStarted):
            bus.dsn = pg_dsn
