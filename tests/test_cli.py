"""The ``pgbus`` command line, run for real against PostgreSQL (subprocess or CliRunner)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncpg
import pytest
from click.testing import CliRunner

import pgbus
import pgbus.durable
from pgbus.cli import cli
from pgbus.cli._top import Board
from pgbus.testing import RecordingPlugin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["listen", "publish", "plugins", "doctor", "top", "schema", "demo"]
DEAD_DSN = "postgresql://postgres@127.0.0.1:1/postgres"


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A module of event models on a fresh channel: ``(module name, channel)``."""
    name = f"cli_events_{uuid.uuid4().hex[:8]}"
    channel = f"cli_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(f"""
            import pgbus

            class OrderPlaced(pgbus.Event, channel={channel!r}):
                '''A customer placed an order.'''
                order_id: int
                total: float = 0.0

            class OrderShipped(pgbus.Event, channel={channel!r}):
                order_id: int

            class NoChannel(pgbus.Event):
                x: int

            class Plugin:
                @pgbus.hookimpl
                def pgbus_on_received(self, messages):
                    pass
        """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, channel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def invoke(*args: str, dsn: str | None = None, stdin: str | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process (in a thread when called from async code)."""
    runner = CliRunner()
    env = {"PGBUS_DSN": dsn} if dsn else {"PGBUS_DSN": ""}
    result = runner.invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


async def ainvoke(
    *args: str, dsn: str | None = None, stdin: str | None = None
) -> tuple[int, str, str]:
    return await asyncio.to_thread(invoke, *args, dsn=dsn, stdin=stdin)


# -- help and version --------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    """`pgbus COMMAND --help` explains the command and exits 0."""
    code, out, _ = invoke(command, "--help")
    assert code == 0
    assert f"Usage: cli {command}" in out or f"Usage: pgbus {command}" in out


def test_group_help_lists_every_command() -> None:
    """`pgbus --help` lists every command."""
    code, out, _ = invoke("--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out


async def test_python_dash_m_runs_the_cli(spawn) -> None:
    """`python -m pgbus --version` prints the version."""
    proc = await spawn("--version")
    code, out, _ = await proc.finish()
    assert code == 0
    assert pgbus.__version__ in out


# -- publish and listen ------------------------------------------------------------------


@pytest.fixture
async def notifications(
    pg_dsn: str,
) -> AsyncIterator[tuple[asyncpg.Connection, asyncio.Queue[tuple[str, str]]]]:
    """A plain asyncpg listener: ``(conn, queue of (channel, payload))``."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn, queue
    finally:
        await conn.close()


async def _listen_raw(
    conn: asyncpg.Connection, queue: asyncio.Queue[tuple[str, str]], channel: str
) -> None:
    await conn.add_listener(channel, lambda _c, _p, ch, payload: queue.put_nowait((ch, payload)))


async def test_publish_raw_payload(pg_dsn: str, notifications, channel: str) -> None:
    """`pgbus publish CHANNEL PAYLOAD` sends the payload as it is."""
    conn, queue = notifications
    await _listen_raw(conn, queue, channel)
    code, out, _ = await ainvoke("publish", channel, "hello [b]world", "--json", dsn=pg_dsn)
    assert code == 0
    assert json.loads(out) == {"channel": channel, "type": None, "id": None, "bytes": 14}
    assert await asyncio.wait_for(queue.get(), 5) == (channel, "hello [b]world")


async def test_publish_reads_stdin(pg_dsn: str, notifications, channel: str) -> None:
    """`pgbus publish CHANNEL -` sends what stdin holds (without the final newline)."""
    conn, queue = notifications
    await _listen_raw(conn, queue, channel)
    code, _, _ = await ainvoke("publish", channel, "-", dsn=pg_dsn, stdin="from stdin\n")
    assert code == 0
    assert await asyncio.wait_for(queue.get(), 5) == (channel, "from stdin")


async def test_publish_model_sends_a_validated_envelope(
    pg_dsn: str, notifications, models: tuple[str, str]
) -> None:
    """With --model the JSON is validated and sent as an envelope with its headers."""
    module, channel = models
    conn, queue = notifications
    await _listen_raw(conn, queue, channel)
    code, out, _ = await ainvoke(
        "publish", channel, '{"order_id": 7}', "--model", f"{module}:OrderPlaced",
        "-H", "trace=abc", "--json", dsn=pg_dsn,
    )  # fmt: skip
    assert code == 0, out
    result = json.loads(out)
    _, payload = await asyncio.wait_for(queue.get(), 5)
    envelope = json.loads(payload)
    assert envelope["type"] == "OrderPlaced"
    assert envelope["id"] == result["id"]
    assert envelope["data"] == {"order_id": 7, "total": 0.0}
    assert envelope["headers"] == {"trace": "abc"}
    assert result["bytes"] == len(payload.encode())


async def test_listen_prints_raw_and_decoded_events_as_json(
    pg_dsn: str, spawn, models: tuple[str, str]
) -> None:
    """`pgbus listen --model --json` prints one JSON line per event, invalid ones flagged."""
    module, channel = models
    listener = await spawn(
        "listen", "--model", f"{module}:OrderPlaced", "--json", "-n", "2", "--for", "20",
        PGBUS_DSN=pg_dsn,
    )  # fmt: skip
    assert "listening on" in await listener.line("stderr")
    code, _, _ = await ainvoke(
        "publish", channel, '{"order_id": 1}', "-m", f"{module}:OrderPlaced", dsn=pg_dsn
    )
    assert code == 0
    await ainvoke("publish", channel, '{"order_id": "not a number"}', dsn=pg_dsn)
    first = json.loads(await listener.line())
    second = json.loads(await listener.line())
    code, _, _ = await listener.finish()
    assert code == 0
    assert first["type"] == "OrderPlaced"
    assert first["event"] == {"order_id": 1, "total": 0.0}
    assert first["channel"] == channel
    assert "order_id" in second["error"]
    assert second["payload"] == '{"order_id": "not a number"}'


async def test_listen_pretty_shows_raw_payloads(pg_dsn: str, spawn, channel: str) -> None:
    """Without --json, `pgbus listen` prints the time, the channel and the payload."""
    listener = await spawn("listen", channel, "-n", "1", "--for", "20", PGBUS_DSN=pg_dsn)
    assert "listening on" in await listener.line("stderr")
    await ainvoke("publish", channel, "[red]plain text[/red]", dsn=pg_dsn)
    line = await listener.line()
    code, _, _ = await listener.finish()
    assert code == 0
    assert channel in line
    assert "[red]plain text[/red]" in line  # printed literally, not as markup


async def test_listen_fails_when_count_is_not_reached(pg_dsn: str, channel: str) -> None:
    """`--count` with `--for` exits 1 when too few notifications came."""
    code, _, err = await ainvoke("listen", channel, "-n", "1", "--for", "0.3", dsn=pg_dsn)
    assert code == 1
    assert "timed out after 0.3 s with 0 of 1" in err


# -- bad input: one line, non-zero, never a traceback ------------------------------------


@pytest.mark.parametrize(
    ("args", "needs_dsn", "message"),
    [
        (["publish", "c", "x"], False, "no database: pass --dsn, set PGBUS_DSN, or set the libpq"),
        (["listen", "c"], False, "no database"),
        (["doctor"], False, "no database"),
        (["--dsn", DEAD_DSN, "--timeout", "1", "publish", "c", "x"], False, "Connect call failed"),
        (["--dsn", DEAD_DSN, "--timeout", "1", "listen", "c"], False, "Connect call failed"),
        (["--dsn", "postgresql://x@127.0.0.1:badport/db", "publish", "c", "x"], False, "badport"),
        (["--dsn", "not a dsn", "listen", "c"], False, "invalid DSN"),
        (["publish", "x" * 64, "payload"], True, "is 64 bytes; PostgreSQL allows at most 63"),
        (["listen", "x" * 64], True, "is 64 bytes"),
        (["publish", "c", "{}", "-m", "no_such_module:Event"], True, "cannot import"),
        (["publish", "c", "{}", "-m", "MODULE:Missing"], True, "has no attribute 'Missing'"),
        (["publish", "c", "{}", "-m", "MODULE:NoChannel"], True, "has no channel"),
        (["publish", "c", "{}", "-m", "MODULE:Plugin"], True, "is not a pgbus.Event subclass"),
        (["publish", "c", "{}", "-m", "not-a-path"], True, "is not of the form module:Class"),
        (["publish", "CHANNEL", '{"order_id": ', "-m", "MODULE:OrderPlaced"], True, "Invalid JSON"),
        (["publish", "CHANNEL", '{"order_id": "x"}', "-m", "MODULE:OrderPlaced"], True,
         "invalid OrderPlaced: order_id"),
        (["publish", "other", "{}", "-m", "MODULE:OrderPlaced"], True, "is published on"),
        (["publish", "c", "x", "-H", "a=b"], True, "--header needs --model"),
        (["publish", "CHANNEL", "-m", "MODULE:OrderPlaced"], True, "give the event as JSON"),
        (["listen"], True, "give at least one CHANNEL or --model"),
        (["schema", "no_such_module"], True, "cannot import"),
        (["schema", "json"], True, "defines no pgbus.Event with a channel"),
        (["plugins", "-p", "no_such_module"], True, "cannot import"),
        (["publish", "c", "x" * 8000], True, "NOTIFY accepts at most 7999"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(
    pg_dsn: str, models: tuple[str, str], args: list[str], needs_dsn: bool, message: str
) -> None:
    """Each kind of bad input gives one `Error:` line on stderr and a non-zero exit."""
    module, channel = models
    args = [a.replace("MODULE", module).replace("CHANNEL", channel) for a in args]
    code, out, err = invoke(*args, dsn=pg_dsn if needs_dsn else None)
    assert code != 0
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert message in errors[0]


async def test_bad_dsn_in_a_real_process_prints_no_traceback(spawn) -> None:
    """A wrong DSN in a real `pgbus` process: exit 1, one error line, no traceback."""
    proc = await spawn("--timeout", "1", "publish", "c", "x", PGBUS_DSN=DEAD_DSN)
    code, _, err = await proc.finish()
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().startswith("Error:")
    assert len(err.strip().splitlines()) == 1


# -- plugins -----------------------------------------------------------------------------


def test_plugins_lists_built_ins_and_code_plugins(models: tuple[str, str]) -> None:
    """`pgbus plugins --json` gives each plugin's source and hooks."""
    module, _ = models
    code, out, _ = invoke("plugins", "--no-entrypoints", "-p", f"{module}:Plugin", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["codec"]["source"] == "built-in"
    assert rows["codec"]["hooks"] == ["pgbus_decoder", "pgbus_encoder"]
    code_plugins = [row for row in rows.values() if row["source"] == "code"]
    assert [row["hooks"] for row in code_plugins] == [["pgbus_on_received"]]
    assert f"{module}:Plugin" in rows


def test_plugins_warns_about_a_module_with_no_hooks() -> None:
    """`pgbus plugins -p json` says that json implements no pgbus hook."""
    code, _, err = invoke("plugins", "--no-entrypoints", "-p", "json")
    assert code == 0
    assert "warning: json implements no pgbus_* hook" in err


def test_publish_without_a_payload_is_a_usage_error() -> None:
    """`pgbus publish CHANNEL` with no PAYLOAD is a usage error (status 2), not an empty NOTIFY."""
    code, _, err = invoke("publish", "orders")
    assert code == 2
    assert "give a PAYLOAD" in err


async def test_dsn_is_taken_after_the_subcommand(pg_dsn: str, channel: str) -> None:
    """--dsn works after the subcommand's name too (`pgbus publish c x --dsn ...`)."""
    code, out, err = await ainvoke("publish", channel, "x", "--dsn", pg_dsn)
    assert code == 0, err
    assert f"published payload on {channel}" in out


def test_plugins_table_names_the_sources() -> None:
    """The table shows every built-in plugin with its source."""
    code, out, _ = invoke("plugins", "--no-entrypoints")
    assert code == 0
    assert "built-in" in out
    for name in ("codec", "routing", "backoff", "metrics"):
        assert name in out


def test_plugins_honours_disable_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """PGBUS_DISABLE_PLUGINS hides a built-in from the list, as it would from a Bus."""
    monkeypatch.setenv("PGBUS_DISABLE_PLUGINS", "metrics")
    code, out, _ = invoke("plugins", "--no-entrypoints", "--json")
    assert code == 0
    assert "metrics" not in {row["name"] for row in json.loads(out)}


# -- doctor ------------------------------------------------------------------------------


def test_doctor_passes_on_a_direct_connection(pg_dsn: str) -> None:
    """`pgbus doctor` reports a working LISTEN, the version and the queue, and exits 0."""
    code, out, _ = invoke("doctor", "--json", dsn=pg_dsn)
    report = json.loads(out)
    assert code == 0, report
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["LISTEN"]["status"] == "ok"
    assert checks["server"]["detail"].startswith("PostgreSQL ")
    assert checks["encoding"]["status"] == "ok"
    assert "notification queue" in checks["notify queue"]["detail"]
    assert "7999 bytes" in checks["max payload"]["detail"]
    assert "durable schema" in checks


def test_doctor_fails_on_a_sql_ascii_database(sql_ascii_dsn: str) -> None:
    """`pgbus doctor` fails a SQL_ASCII database and says its encoding needs fixing."""
    code, out, _ = invoke("doctor", "--json", dsn=sql_ascii_dsn)
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1
    assert checks["encoding"]["status"] == "fail"
    assert "encoding is SQL_ASCII" in checks["encoding"]["detail"]
    assert "ENCODING 'UTF8'" in checks["encoding"]["fix"]


def test_doctor_fails_without_a_server() -> None:
    """`pgbus doctor` on an unreachable server exits 1 and says what to fix."""
    code, out, _ = invoke("--timeout", "1", "doctor", dsn=DEAD_DSN)
    assert code == 1
    assert "cannot connect" in out
    assert "fix:" in out


# -- schema ------------------------------------------------------------------------------


def test_schema_groups_models_by_channel(models: tuple[str, str]) -> None:
    """`pgbus schema MODULE` gives each event's data and envelope schema per channel."""
    module, channel = models
    code, out, _ = invoke("schema", module)
    assert code == 0
    document = json.loads(out)
    events = document["channels"][channel]
    assert set(events) == {"OrderPlaced", "OrderShipped"}
    placed = events["OrderPlaced"]
    assert placed["python"] == f"{module}:OrderPlaced"
    assert placed["data"]["required"] == ["order_id"]
    envelope = placed["envelope"]
    assert envelope["properties"]["type"]["const"] == "OrderPlaced"
    assert set(envelope["required"]) >= {"v", "id", "ts", "type", "data"}


def test_schema_asyncapi_document(models: tuple[str, str]) -> None:
    """`pgbus schema --asyncapi` writes an AsyncAPI 3 document with resolvable refs."""
    module, channel = models
    code, out, _ = invoke("schema", f"{module}:OrderPlaced", "--asyncapi", "--title", "Shop")
    assert code == 0
    doc = json.loads(out)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "Shop"
    assert doc["channels"][channel]["address"] == channel
    message = doc["components"]["messages"][f"{channel}.OrderPlaced"]
    assert message["summary"] == "A customer placed an order."
    ref = message["payload"]["$ref"].rsplit("/", 1)[1]
    schema = doc["components"]["schemas"][ref]
    data_ref = schema["properties"]["data"]["$ref"].rsplit("/", 1)[1]
    assert doc["components"]["schemas"][data_ref]["title"] == "OrderPlaced"


def test_schema_to_a_file_says_what_it_wrote(models: tuple[str, str], tmp_path: Path) -> None:
    """`pgbus schema -o FILE` writes the file and says so on stderr."""
    module, _ = models
    code, out, err = invoke("schema", module, "-o", str(tmp_path / "events.json"))
    assert code == 0
    assert out == ""
    assert f"wrote the JSON Schema of 2 event types to {tmp_path / 'events.json'}" in err
    assert "OrderPlaced" in (tmp_path / "events.json").read_text()


# -- top and the metrics publisher -------------------------------------------------------


async def test_top_shows_a_running_bus(pg_dsn: str, spawn, make_bus, channel: str) -> None:
    """`pgbus top --json` shows the counters and rates a MetricsPublisher sends."""
    metrics_channel = f"m_{uuid.uuid4().hex[:10]}"
    bus = make_bus(plugins=[pgbus.MetricsPublisher(interval=0.1, channel=metrics_channel)])
    handled = asyncio.Event()

    @bus.subscribe(channel)
    async def on_message(_message: pgbus.Message) -> None:
        handled.set()

    top = await spawn(
        "top", "--channel", metrics_channel, "--json", "--for", "20", PGBUS_DSN=pg_dsn
    )
    assert "listening on" in await top.line("stderr")
    await bus.start()
    await bus.notify(channel, "x")
    await asyncio.wait_for(handled.wait(), 5)
    while True:  # the first snapshots may predate the event, and rates need two
        snapshot = json.loads(await top.line())
        received = snapshot["channels"].get(channel, {}).get("received")
        rate = snapshot["rates"].get(channel, {}).get("received")
        if received == 1 and rate == 0.0:  # two snapshots after the event
            break
    top.proc.terminate()
    await top.finish()
    assert snapshot["pid"] == os.getpid()
    assert snapshot["connected"] is True
    assert snapshot["rates"][channel]["handled"] == 0.0


async def test_top_once_prints_a_table(pg_dsn: str, spawn, make_bus, channel: str) -> None:
    """`pgbus top --once` prints one table with each channel of each bus."""
    metrics_channel = f"m_{uuid.uuid4().hex[:10]}"
    bus = make_bus(plugins=[pgbus.MetricsPublisher(interval=0.1, channel=metrics_channel)])
    bus.subscribe(channel)(lambda _m: None)
    await bus.start()
    top = await spawn(
        "top", "--channel", metrics_channel, "--once", "--for", "20", PGBUS_DSN=pg_dsn
    )
    code, out, err = await top.finish()
    assert code == 0, err
    assert "pgbus top: 1 bus\n" in out
    assert channel in out


def test_top_once_fails_without_publishers(pg_dsn: str) -> None:
    """`pgbus top --once` with no bus publishing exits 1 and says what to do."""
    code, _, err = invoke(
        "top", "--channel", f"m_{uuid.uuid4().hex}", "--once", "--for", "0.3", dsn=pg_dsn
    )
    assert code == 1
    assert "MetricsPublisher" in err


async def test_metrics_publisher_snapshot_counts_and_lag(make_bus, channel: str) -> None:
    """A snapshot has per-channel counters, handled counts and the lag of the interval."""

    class Ping(pgbus.Event, channel=channel):
        n: int

    publisher = pgbus.MetricsPublisher(interval=60)
    recorder = RecordingPlugin()
    bus = make_bus(plugins=[publisher, recorder])

    @bus.subscribe(Ping)
    async def on_ping(_event: Ping) -> None:
        pass

    async with bus:
        await bus.publish(Ping(n=1))
        await recorder.wait_handled(Ping)
        first = publisher.snapshot(bus)
        second = publisher.snapshot(bus)
    stats = first["channels"][channel]
    assert stats["published"] == 1
    assert stats["received"] == 1
    assert stats["handled"] == 1
    assert stats["lag_avg"] is not None
    assert stats["lag_max"] >= stats["lag_avg"] >= 0
    assert second["channels"][channel]["lag_avg"] is None  # reset each interval
    assert first["subscriptions"][on_ping.__qualname__]["pending"] == 0
    assert json.loads(publisher.encode(first) or "")["bus"] == publisher.bus_id


def test_metrics_publisher_shrinks_oversized_snapshots() -> None:
    """A snapshot too large for NOTIFY loses its subscriptions and says so."""
    publisher = pgbus.MetricsPublisher()
    snapshot = {"channels": {}, "subscriptions": {f"s{i}": {"handled": i} for i in range(2000)}}
    payload = publisher.encode(snapshot)
    assert payload is not None
    assert json.loads(payload) == {"channels": {}, "subscriptions": {}, "truncated": True}
    huge = {"channels": {f"c{i}": {"x": i} for i in range(2000)}, "subscriptions": {}}
    assert publisher.encode(huge) is None


def test_metrics_publisher_rejects_bad_settings() -> None:
    """A non-positive interval or a bad channel is a ConfigError."""
    with pytest.raises(pgbus.ConfigError):
        pgbus.MetricsPublisher(interval=0)
    with pytest.raises(pgbus.InvalidChannel):
        pgbus.MetricsPublisher(channel="x" * 64)


def test_board_computes_rates_between_snapshots() -> None:
    """`pgbus top` turns two snapshots of counters into per-second rates."""
    board = Board()
    first = board.add({"bus": "b", "ts": 10.0, "channels": {"c": {"published": 5}}})
    assert first["rates"]["c"]["published"] is None
    second = board.add({"bus": "b", "ts": 12.0, "channels": {"c": {"published": 9}}})
    assert second["rates"]["c"]["published"] == 2.0
    board.prune(now=100.0)
    assert board.latest == {}


# -- demo --------------------------------------------------------------------------------


async def test_demo_runs_end_to_end(pg_dsn: str, spawn) -> None:
    """`pgbus demo` shows typed events, retries, a dead letter, a reconnect and metrics."""
    proc = await spawn("demo", PGBUS_DSN=pg_dsn)
    code, out, err = await proc.finish(timeout=60)
    assert code == 0, err
    for text in (
        "binaries in /",  # which PostgreSQL it ran on
        "Typed events",
        "handled OrderPlaced #3",
        "attempt 2 for order 1",
        "charged order 1 on attempt 3",
        "dead letter",
        "after 3 attempts",
        "reconnected as pid",
        "handled OrderPlaced #4",
        "Metrics",
        "done",
    ):
        assert text in out, text
    assert "Traceback" not in err


# -- doctor through a real PgBouncer -----------------------------------------------------


def _pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


@pytest.fixture(params=["transaction", "session"])
async def pgbouncer_dsn(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """A real PgBouncer in front of pg_dsn: ``(pool mode, DSN through it)``."""
    binary = _pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    parts = urlsplit(pg_dsn)
    port = _free_port()
    mode = request.param
    workdir = tmp_path / "pgbouncer"
    workdir.mkdir()
    workdir.chmod(0o777)  # PgBouncer refuses root; as root it runs as nobody
    config = workdir / "pgbouncer.ini"
    server = f"host={parts.hostname or '127.0.0.1'} port={parts.port or 5432}"
    config.write_text(
        textwrap.dedent(f"""
            [databases]
            * = {server} user={parts.username or "postgres"}
            [pgbouncer]
            listen_addr = 127.0.0.1
            listen_port = {port}
            unix_socket_dir =
            auth_type = any
            pool_mode = {mode}
            default_pool_size = 4
        """)
    )
    config.chmod(0o644)
    args = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), str(config)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:

        async def ready() -> None:
            assert proc.stdout is not None
            while b"process up" not in (line := await proc.stdout.readline()):
                if not line:
                    raise AssertionError("pgbouncer exited before it was up")

        await asyncio.wait_for(ready(), 15)
        yield mode, f"postgresql://{parts.username or 'postgres'}@127.0.0.1:{port}/postgres"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def test_doctor_detects_a_transaction_pooler(pgbouncer_dsn: tuple[str, str]) -> None:
    """Through PgBouncer in transaction mode LISTEN fails the check; in session mode it passes."""
    mode, dsn = pgbouncer_dsn
    code, out, _ = await ainvoke("doctor", "--json", dsn=dsn)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    if mode == "transaction":
        assert code == 1
        assert checks["LISTEN"]["status"] == "fail"
        assert "PgBouncer" in checks["LISTEN"]["fix"]
    else:
        assert code == 0
        assert checks["LISTEN"]["status"] == "ok"
    assert checks["server"]["status"] == "ok"


def test_demo_starts_and_removes_a_throwaway_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no PGBUS_DSN and nothing on the default address, the demo brings its own server."""
    from pgbus import server

    if not server.find_bindirs():
        pytest.skip("no PostgreSQL server binaries to start a throwaway cluster from")
    monkeypatch.setattr(server, "DEFAULT_DSN", DEAD_DSN)
    monkeypatch.setattr("pgbus.cli._demo.DEFAULT_DSN", DEAD_DSN)
    code, out, err = invoke("demo")
    assert code == 0, err
    match = re.search(r"a throwaway PostgreSQL at (\S+) \(removed afterwards\)", out)
    assert match is not None, out
    assert "done" in out
    assert not server.server_reachable(match[1], timeout=1.0)


async def test_doctor_reports_the_durable_schema(pg_dsn: str) -> None:
    """`pgbus doctor --schema` says whether the durable schema is missing, current or old."""
    schema = f"doctor_{uuid.uuid4().hex[:8]}"

    async def durable_check() -> tuple[int, dict[str, str]]:
        code, out, _ = await ainvoke("doctor", "--schema", schema, "--json", dsn=pg_dsn)
        checks = {c["name"]: c for c in json.loads(out)["checks"]}
        return code, checks["durable schema"]

    code, check = await durable_check()
    assert (code, check["status"]) == (0, "info")
    assert "not installed" in check["detail"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await pgbus.durable.migrate(conn, schema)
        code, check = await durable_check()
        assert (code, check["status"]) == (0, "ok")
        await conn.execute(f'DELETE FROM "{schema}".schema_version')
        code, check = await durable_check()
        assert (code, check["status"]) == (1, "fail")
        assert "pgbus migrate" in check["fix"]
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_listen_stops_cleanly_on_ctrl_c(pg_dsn: str, spawn, channel: str) -> None:
    """Ctrl-C (SIGINT) ends `pgbus listen` with status 130, as a shell expects, no traceback."""
    listener = await spawn("listen", channel, PGBUS_DSN=pg_dsn)
    assert "listening on" in await listener.line("stderr")
    listener.proc.send_signal(signal.SIGINT)
    code, _, err = await listener.finish()
    assert code == 130
    assert "Traceback" not in err
