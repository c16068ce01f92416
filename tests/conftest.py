"""Fixtures that find or start a real PostgreSQL server (see pgbus.server).

``pg_dsn``: ``$PGBUS_TEST_DSN``, else ``127.0.0.1:5432`` if it answers, else ``pg_cluster``.
``pg_cluster``: a throwaway cluster owned by the tests, the only server tests may stop.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from _proxy import TcpProxy  # tests/ is on sys.path: pytest puts a rootless conftest's dir there

from pgbus.server import DEFAULT_DSN, ClusterError, TempCluster, find_bindirs, server_reachable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


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
    if _in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of a server for tests that do not stop it."""
    if dsn := os.environ.get("PGBUS_TEST_DSN"):
        return dsn
    if server_reachable(DEFAULT_DSN, timeout=2.0):
        return DEFAULT_DSN
    cluster: TempCluster = request.getfixturevalue("pg_cluster")
    return cluster.dsn


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
