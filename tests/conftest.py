"""Fixtures that find or start a real PostgreSQL server (see pgbus.server).

``pg_dsn``: ``$PGBUS_TEST_DSN``, else ``127.0.0.1:5432`` if it answers, else ``pg_cluster``.
``pg_cluster``: a throwaway cluster owned by the tests, the only server tests may stop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncpg
import pytest
from _helpers import Process, cli_env, missing
from _proxy import TcpProxy  # tests/ is on sys.path: pytest puts a rootless conftest's dir there

import pgbus
from pgbus.server import DEFAULT_DSN, ClusterError, TempCluster, find_bindirs, server_reachable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TempCluster]:
    """A throwaway cluster owned by the tests: safe to stop, kill and restart."""
    failures: list[str] = []
    for bindir in find_bindirs():
        cluster = TempCluster(bindir, max_connections=400)
        try:
            cluster.start()
        except (ClusterError, OSError) as exc:
            cluster.destroy()
            failures.append(f"{bindir}: {exc}")
            continue
        try:
            yield cluster
        finally:
            cluster.destroy()
        return
    reason = "no PostgreSQL server binaries could start a throwaway cluster: " + (
        "; ".join(failures) or "none found (install postgresql or pgbus[embedded])"
    )
    missing(reason)


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of a server for tests that do not stop it."""
    if dsn := os.environ.get("PGBUS_TEST_DSN"):
        return dsn
    if server_reachable(DEFAULT_DSN, timeout=2.0):
        return DEFAULT_DSN
    cluster: TempCluster = request.getfixturevalue("pg_cluster")
    return cluster.dsn


@pytest.fixture(scope="session")
def sql_ascii_dsn(pg_dsn: str) -> Iterator[str]:
    """A database of the test server whose encoding is SQL_ASCII, dropped at the end."""
    name = f"pgbus_ascii_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(
        run(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    )
    try:
        yield urlsplit(pg_dsn)._replace(path=f"/{name}").geturl()
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Process]]]:
    """Start ``python -m pgbus ARGS`` (``python ARGS`` with ``python=True``) in ``tmp_path``.

    Keyword arguments are environment variables; every process is killed at teardown.
    """
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str, python: bool = False, **env: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *(() if python else ("-m", "pgbus")),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=cli_env(**env),
        )
        procs.append(proc)
        return Process(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def tcp_proxy(pg_dsn: str) -> AsyncIterator[TcpProxy]:
    """A fault-injecting TCP proxy in front of ``pg_dsn``; use ``tcp_proxy.dsn_for(pg_dsn)``."""
    parts = urlsplit(pg_dsn)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# --- bus fixtures ---


class Recorder:
    """Collects what handlers receive; tests wait on it with a timeout, never sleep."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.items: list[object] = []

    async def __call__(self, item: object) -> None:
        self.items.append(item)
        await self.queue.put(item)

    async def next(self, timeout: float = 5.0) -> object:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def take(self, n: int, timeout: float = 10.0) -> list[object]:
        return [await self.next(timeout) for _ in range(n)]

    async def nothing_more(self, timeout: float = 0.2) -> bool:
        """True when nothing arrives within ``timeout`` (use after a later marker)."""
        try:
            await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


#: The buses a ``both_buses`` test runs on.
BUS_KINDS = ("postgresql", "memory")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test marked ``both_buses`` once per bus kind: the shared behaviour set.

    Its ``make_bus`` and ``durable_bus`` then build buses on the test server, or on one
    fresh ``memory://`` broker of the test, so the two buses cannot drift apart.
    """
    if metafunc.definition.get_closest_marker("both_buses") and "bus_kind" in metafunc.fixturenames:
        metafunc.parametrize("bus_kind", BUS_KINDS)


@pytest.fixture
def bus_kind() -> str:
    """The bus a test's ``make_bus`` builds: PostgreSQL unless marked ``both_buses``."""
    return "postgresql"


@pytest.fixture
def bus_dsn(bus_kind: str, pg_dsn: str) -> str:
    """The DSN of the buses of this test: the test server, or a memory broker of its own."""
    return f"memory://{uuid.uuid4().hex}" if bus_kind == "memory" else pg_dsn


@pytest.fixture
async def make_bus(bus_dsn: str) -> AsyncIterator[Callable[..., pgbus.Bus]]:
    """Build buses on the test database (entry points off); all are stopped at teardown.

    In a ``both_buses`` test, on a ``memory://`` broker too (see :func:`bus_dsn`).
    """
    buses: list[pgbus.Bus] = []

    def make(dsn: str | None = None, **options: object) -> pgbus.Bus:
        options.setdefault("load_entrypoints", False)
        bus = pgbus.Bus(dsn or bus_dsn, **options)  # type: ignore[arg-type]
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop()


@pytest.fixture
async def pg_conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection for SQL the test runs itself."""
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()
