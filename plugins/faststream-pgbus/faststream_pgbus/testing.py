"""``TestPgbusBroker``: run a PgbusBroker on pgbus's in-memory bus, with no PostgreSQL."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

    from faststream_pgbus._broker import PgbusBroker

__all__ = ["TestPgbusBroker"]

_names = itertools.count(1)


class TestPgbusBroker:
    """Start ``broker`` on a fresh ``memory://`` bus for the block; restore it after.

    Everything runs as it would on PostgreSQL (pgbus's codec, routing, retries, dead
    letters, FastStream's decoding and dependency injection), in this process::

        async with TestPgbusBroker(broker) as br:
            await br.publish({"order_id": 1}, channel="orders")
    """

    __test__ = False  # not a pytest test class

    def __init__(self, broker: PgbusBroker) -> None:
        self.broker = broker
        self._dsn: str | None = None

    async def __aenter__(self) -> PgbusBroker:
        self._dsn = self.broker.dsn
        self.broker.dsn = f"memory://faststream-test-{next(_names)}"
        await self.broker.start()
        return self.broker

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.broker.stop(exc_type, exc, tb)
        finally:
            self.broker.dsn = self._dsn
