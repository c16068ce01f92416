"""Fixtures: a real PostgreSQL server (``$PGBUS_TEST_DSN``, 127.0.0.1:5432, or a throwaway one)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from pgbus.server import local_server

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The DSN of a server: ``$PGBUS_TEST_DSN``, 127.0.0.1:5432, else a throwaway cluster."""
    with local_server(env_var="PGBUS_TEST_DSN") as dsn:
        yield dsn


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses."""
    return f"t_{uuid.uuid4().hex[:12]}"
