"""`pgbus relay` and `pgbus relay status` as real processes, SIGKILL included."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pgbus

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nats_server import StreamReader


TIMEOUT = 60.0


def pgbus_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgbus --dsn DSN ARGS`` to completion."""
    argv = [sys.executable, "-m", "pgbus", "--dsn", dsn, *args]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


async def start_relay(dsn: str, log: Path, *args: str) -> asyncio.subprocess.Process:
    """Start ``pgbus relay ARGS`` in the background, its output into ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgbus",
            "-v",
            "--dsn",
            dsn,
            "relay",
            *args,
            stdout=out,
            stderr=out,
        )


async def test_a_relay_sigkilled_mid_stream_and_restarted_loses_and_duplicates_nothing(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    to_jetstream: str,
    reader: StreamReader,
    pgbus_channel: str,
    tmp_path: Path,
) -> None:
    """SIGKILL mid-stream, restart: JetStream holds every event exactly once."""

    class Tick(pgbus.Event, channel=pgbus_channel):
        n: int

    args = ["--to", to_jetstream, "--channel", pgbus_channel]
    args += ["--schema", schema, "--lease", "2"]
    log = tmp_path / "relay.log"
    bus = durable_bus()
    ids: list[str] = []
    async with bus:
        relay = await start_relay(pgbus_dsn, log, *args)
        try:
            for start in range(0, 1000, 100):
                ids += [await bus.publish(Tick(n=n)) for n in range(start, start + 100)]
            await reader.take(200, TIMEOUT)  # it is relaying: kill it in the middle
            relay.send_signal(signal.SIGKILL)
            await asyncio.wait_for(relay.wait(), TIMEOUT)
            for start in range(1000, 2000, 100):
                ids += [await bus.publish(Tick(n=n)) for n in range(start, start + 100)]
            relay = await start_relay(pgbus_dsn, log, *args)
            messages = await reader.take(2000, TIMEOUT)
        finally:
            relay.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(relay.wait(), TIMEOUT)
    assert code == 0, log.read_text()
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
    assert await reader.count() == 2000  # nothing twice: JetStream de-duplicated resends

    result = pgbus_cli(pgbus_dsn, "relay", "status", "--schema", schema, "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["relay"] == "relay"
    assert row["channel"] == pgbus_channel
    assert row["lag"] == 0
    assert row["failing"] is False
    table = pgbus_cli(pgbus_dsn, "relay", "status", "--schema", schema)
    assert table.returncode == 0, table.stderr
    assert pgbus_channel in table.stdout
    assert "ok" in table.stdout


def test_relay_status_says_when_no_relay_ever_started(pgbus_dsn: str, schema: str) -> None:
    """`pgbus relay status` on a schema without relays says so and exits 0."""
    result = pgbus_cli(pgbus_dsn, "relay", "status", "--schema", schema)
    assert result.returncode == 0, result.stderr
    assert "no relay has started yet" in result.stdout


def test_relay_without_a_broker_or_channel_is_a_usage_error(pgbus_dsn: str) -> None:
    """`pgbus relay` needs --to and at least one --channel (exit status 2)."""
    result = pgbus_cli(pgbus_dsn, "relay", "--channel", "orders")
    assert result.returncode == 2
    assert "--to URL" in result.stderr
    result = pgbus_cli(pgbus_dsn, "relay", "--to", "kafka://127.0.0.1:9092")
    assert result.returncode == 2
    assert "--channel" in result.stderr
    result = pgbus_cli(pgbus_dsn, "relay", "--to", "amqp://x", "--channel", "orders")
    assert result.returncode == 1
    assert "the supported brokers are kafka://, nats://" in result.stderr


def test_pgbus_help_lists_the_relay_command_and_stays_light() -> None:
    """`pgbus --help` lists `relay` (pgbus.commands entry point) without loading asyncpg."""
    code = (
        "import sys\nfrom pgbus.cli import main\nsys.argv = ['pgbus', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', [m for m in ('asyncpg', 'nats', 'aiokafka') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "relay" in result.stdout
    assert "Kafka or NATS JetStream" in result.stdout
    assert "LOADED []" in result.stdout
