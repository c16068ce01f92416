"""One identifier check: channels, change triggers and the durable schema refuse names alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import pgbus
from pgbus import durable
from pgbus.changes import check_identifier

if TYPE_CHECKING:
    import asyncpg

BAD = ["", "a\x00b", "x" * 64, "é" * 32, 5, "\udc80"]
#: What each bad name is refused for, whoever checks it.
REASONS = ["must not be empty", "NUL", "66 bytes|64 bytes", "64 bytes", "must be a str", "UTF-8"]


def _reason(bad: object) -> str:
    return REASONS[BAD.index(bad)]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_channel_is_an_invalid_identifier(bad: object) -> None:
    """A bad channel raises InvalidChannel, which is an InvalidIdentifier and a ConfigError."""
    bus = pgbus.Bus("postgresql://nobody@127.0.0.1:1/none", load_entrypoints=False)
    with pytest.raises(pgbus.InvalidChannel, match=_reason(bad)) as info:
        bus.subscribe(bad)(lambda _m: None)  # type: ignore[call-overload]
    assert isinstance(info.value, pgbus.InvalidIdentifier)
    assert isinstance(info.value, pgbus.ConfigError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_schema_of_the_durable_plugin_is_an_invalid_identifier(bad: object) -> None:
    """DurablePlugin(schema=...) refuses a bad name with the same error and reason as channels."""
    with pytest.raises(pgbus.InvalidIdentifier, match=_reason(bad)):
        durable.DurablePlugin(schema=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD)
async def test_durable_schema_functions_refuse_a_bad_name_before_sql(
    pg_conn: asyncpg.Connection, bad: object
) -> None:
    """migrate, check_schema and the dead-letter functions raise InvalidIdentifier, no SQL run."""
    calls = [
        lambda: durable.migrate(pg_conn, bad),  # type: ignore[arg-type]
        lambda: durable.check_schema(pg_conn, bad),  # type: ignore[arg-type]
        lambda: durable.schema_version(pg_conn, bad),  # type: ignore[arg-type]
        lambda: durable.list_dead_letters(pg_conn, bad),  # type: ignore[arg-type]
        lambda: durable.redeliver(pg_conn, [1], bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(pgbus.InvalidIdentifier, match=_reason(bad)):
            await call()
    assert await pg_conn.fetchval("SELECT 1") == 1  # the connection is not in a failed state


@pytest.mark.parametrize("bad", BAD)
async def test_a_bad_trigger_name_gives_the_same_reason(bad: object) -> None:
    """Change triggers refuse bad names with InvalidIdentifier and the shared reasons."""
    with pytest.raises(pgbus.InvalidIdentifier, match=_reason(bad)):
        check_identifier(bad, "table name")
    bus = pgbus.Bus("postgresql://nobody@127.0.0.1:1/none", load_entrypoints=False)
    with pytest.raises(pgbus.InvalidIdentifier, match=_reason(bad)):
        await bus.install_change_trigger(bad, channel="c")  # type: ignore[arg-type]
    await bus.stop()
