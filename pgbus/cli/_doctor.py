"""``pgbus doctor``: check that a database can carry pgbus, and say what to fix."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import click
from rich.table import Table
from rich.text import Text

from pgbus import durable
from pgbus._channels import MAX_PAYLOAD_BYTES
from pgbus._listener import SQL_ASCII_FIX, SQL_ASCII_RISK
from pgbus._util import redact_dsn
from pgbus.cli._common import CONNECT_ERRORS, State, dumps, one_line, stdout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

Status = Literal["ok", "info", "warn", "fail"]

#: Wait this long for the test notification to come back through LISTEN.
LISTEN_PROBE_SECONDS = 2.0

#: Warn when the notification queue is fuller than this (fraction of its size).
QUEUE_WARN = 0.5

#: The oldest PostgreSQL pgbus is tested against.
MIN_SERVER_VERSION = 120000


@dataclasses.dataclass(slots=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


async def _connect(dsn: str, timeout: float) -> asyncpg.Connection:  # noqa: ASYNC109 - passed on to asyncpg
    # no named prepared statements: they break through a transaction-pooling proxy
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, statement_cache_size=0)
    return conn


async def _server(conn: asyncpg.Connection) -> Check:
    version = await conn.fetchval("SHOW server_version")
    number = int(await conn.fetchval("SHOW server_version_num"))
    if number < MIN_SERVER_VERSION:
        return Check(
            "server",
            "warn",
            f"PostgreSQL {version}",
            "pgbus is tested on PostgreSQL 12 and newer; upgrade the server",
        )
    return Check("server", "ok", f"PostgreSQL {version}")


async def _encoding(conn: asyncpg.Connection) -> Check:
    encoding = conn.get_settings().server_encoding
    if encoding == "SQL_ASCII":
        return Check("encoding", "fail", SQL_ASCII_RISK, SQL_ASCII_FIX)
    return Check("encoding", "ok", f"the database's encoding is {encoding}")


async def _listen_works(dsn: str, timeout: float, listener: asyncpg.Connection) -> list[Check]:  # noqa: ASYNC109 - passed on to asyncpg
    """LISTEN on one connection, NOTIFY from another, and look for signs of a pooler."""
    checks: list[Check] = []
    channel = f"pgbus_doctor_{uuid.uuid4().hex[:12]}"
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if not got.done():
            got.set_result(str(payload))

    pids = [await listener.fetchval("SELECT pg_backend_pid()")]
    await listener.add_listener(channel, on_notify)
    notifier = await _connect(dsn, timeout)
    try:
        pids.append(await listener.fetchval("SELECT pg_backend_pid()"))
        other = await notifier.fetchval("SELECT pg_backend_pid()")
        token = uuid.uuid4().hex
        await notifier.execute("SELECT pg_notify($1, $2)", channel, token)
        try:
            received = await asyncio.wait_for(got, LISTEN_PROBE_SECONDS)
        except TimeoutError:
            received = None
        listening = await listener.fetchval(
            "SELECT $1 = ANY(ARRAY(SELECT pg_listening_channels()))", channel
        )
    finally:
        with contextlib.suppress(*CONNECT_ERRORS):
            await listener.remove_listener(channel, on_notify)
        await notifier.close()
    pooled = len(set(pids)) > 1 or other in pids or not listening
    if received == token and not pooled:
        checks.append(Check("LISTEN", "ok", "a notification came back through LISTEN"))
        return checks
    signs = []
    if len(set(pids)) > 1:
        signs.append("one connection ran on several backends")
    if other in pids:
        signs.append("two connections shared one backend")
    if not listening:
        signs.append("the LISTEN did not stay on the connection")
    if received != token:
        signs.append(f"the test notification did not arrive within {LISTEN_PROBE_SECONDS:g} s")
    checks.append(
        Check(
            "LISTEN",
            "fail",
            "LISTEN does not work through this DSN: " + "; ".join(signs),
            "a transaction-pooling proxy (PgBouncer pool_mode=transaction or statement) is"
            " probably in between; give the listener a direct or session-pooled DSN"
            " (see the docs: Running behind PgBouncer)",
        )
    )
    return checks


async def _queue(conn: asyncpg.Connection) -> Check:
    usage = float(await conn.fetchval("SELECT pg_notification_queue_usage()"))
    detail = f"{usage:.1%} of the notification queue in use"
    if usage > QUEUE_WARN:
        return Check(
            "notify queue",
            "warn" if usage < 0.9 else "fail",  # noqa: PLR2004 - 90 %: NOTIFY is about to fail
            detail,
            "a listening session is not reading its notifications (often one left idle in a"
            " transaction); find it in pg_stat_activity and end it",
        )
    return Check("notify queue", "ok", detail)


async def _payload(conn: asyncpg.Connection) -> Check:
    pages = await conn.fetchval("SELECT current_setting('max_notify_queue_pages', true)")
    extra = f"; max_notify_queue_pages = {pages}" if pages else ""
    return Check(
        "max payload",
        "info",
        f"{MAX_PAYLOAD_BYTES - 1} bytes per notification (compiled into PostgreSQL){extra}",
    )


async def _connections(conn: asyncpg.Connection) -> Check:
    used = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity"))
    limit = int(await conn.fetchval("SHOW max_connections"))
    detail = f"{used} of max_connections = {limit} in use"
    if used > 0.8 * limit:
        return Check(
            "connections",
            "warn",
            detail,
            "each Bus holds one LISTEN connection plus its publish pool: raise"
            " max_connections or lower Bus(pool_max_size=...)",
        )
    return Check("connections", "ok", detail)


async def _durable(conn: asyncpg.Connection, schema: str) -> Check:
    name = f"schema {schema!r}"
    version = await durable.schema_version(conn, schema)
    if version is None:
        return Check(
            "durable schema",
            "info",
            f"{name} not installed (only durable mode needs it; `pgbus migrate` creates it)",
        )
    if version < durable.SCHEMA_VERSION:
        return Check(
            "durable schema",
            "fail",
            f"{name} is at version {version}; this pgbus needs {durable.SCHEMA_VERSION}",
            f"run `pgbus migrate --schema {schema}` (durable buses refuse to start until then)",
        )
    if version > durable.SCHEMA_VERSION:
        return Check(
            "durable schema",
            "fail",
            f"{name} is at version {version}, newer than this pgbus understands"
            f" ({durable.SCHEMA_VERSION})",
            "upgrade pgbus on this machine",
        )
    return Check("durable schema", "ok", f"{name} at version {version}")


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def diagnose(dsn: str, timeout: float, schema: str = durable.DEFAULT_SCHEMA) -> list[Check]:  # noqa: ASYNC109 - passed on to asyncpg
    """Run every check against ``dsn`` and return the report, worst last."""
    try:
        conn = await _connect(dsn, timeout)
    except CONNECT_ERRORS as exc:
        return [
            Check(
                "connect",
                "fail",
                f"cannot connect to {redact_dsn(dsn)}: {_text(exc)}",
                "check the DSN (--dsn or PGBUS_DSN) and that the server is running;"
                " `pgbus demo` starts a throwaway one",
            )
        ]
    checks = [Check("connect", "ok", redact_dsn(dsn))]
    steps: list[tuple[str, Callable[[], Awaitable[Check | list[Check]]]]] = [
        ("server", lambda: _server(conn)),
        ("encoding", lambda: _encoding(conn)),
        ("LISTEN", lambda: _listen_works(dsn, timeout, conn)),
        ("notify queue", lambda: _queue(conn)),
        ("max payload", lambda: _payload(conn)),
        ("connections", lambda: _connections(conn)),
        ("durable schema", lambda: _durable(conn, schema)),
    ]
    try:
        for name, step in steps:
            try:
                result = await step()
            except CONNECT_ERRORS as exc:
                checks.append(Check(name, "fail", one_line(exc)))
                continue
            checks.extend(result if isinstance(result, list) else [result])
    finally:
        with contextlib.suppress(*CONNECT_ERRORS):
            await conn.close(timeout=timeout)
    return checks


_MARKS: dict[Status, tuple[str, str]] = {
    "ok": ("✓", "green"),
    "info": ("·", "blue"),
    "warn": ("!", "yellow"),
    "fail": ("✗", "bold red"),
}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--schema",
    default=durable.DEFAULT_SCHEMA,
    show_default=True,
    help="The schema of the durable mode's tables.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def doctor(state: State, schema: str, as_json: bool) -> None:
    """Check that the database works for pgbus, and say what to fix.

    Connects, reports the server version, fails on a SQL_ASCII database (whose
    encoding needs fixing), tests that LISTEN works through this DSN (a
    transaction-pooling proxy such as PgBouncer breaks it silently), the notification
    queue's usage, the payload limit, free connections and the durable schema. Exits
    with status 1 when a check fails.
    """
    checks = asyncio.run(diagnose(state.require_dsn(), state.timeout, schema))
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        report: dict[str, Any] = {
            "ok": not failed,
            "checks": [dataclasses.asdict(c) for c in checks],
        }
        click.echo(dumps(report))
    else:
        table = Table(show_header=False, box=None, padding=(0, 1))
        for check in checks:
            mark, style = _MARKS[check.status]
            detail = Text(check.detail)
            if check.fix:
                detail.append(f"\nfix: {check.fix}", style="italic")
            table.add_row(Text(mark, style=style), Text(check.name, style="bold"), detail)
        stdout().print(table)
    if failed:
        raise SystemExit(1)
