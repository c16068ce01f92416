"""Small helpers shared by the bus, the listener and the publisher."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import re
from typing import Any

import asyncpg

#: Failures of the connection rather than of the statement: a fresh connection may work.
#: (asyncpg's TargetServerAttributeNotMatched, "no writable host right now" during a
#: failover, is an InternalClientError.)
CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,  # "connection was closed in the middle of operation", …
    asyncpg.InternalClientError,  # "another operation is in progress": a FATAL came in idle
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,  # the server is starting up or shutting down
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(?P<head>(?:^|[\s?&])password\s*=\s*)[^\s&]*", re.IGNORECASE)


async def keep_session(_conn: asyncpg.Connection) -> None:
    """The ``reset`` of pgbus's own pools: nothing to undo between two uses.

    Their connections only run statements that leave no session state behind (NOTIFY,
    DDL and queries inside transactions, transaction-level advisory locks).
    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``) would cost a second round trip on every release, which halves the
    rate of single publishes; asyncpg still rolls back a transaction left open.
    """


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, for logs and errors."""
    dsn = _PASSWORD_IN_URL.sub(r"\g<head>:***@", dsn)
    return _PASSWORD_PARAM.sub(r"\g<head>***", dsn)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 channel"``, ``"2 channels"``: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


async def await_all(results: list[Any]) -> None:
    """Await every awaitable among hook ``results`` (fan-out hooks may be ``async def``)."""
    awaitables = [r for r in results if inspect.isawaitable(r)]
    if len(awaitables) == 1:
        await awaitables[0]
    elif awaitables:
        await asyncio.gather(*awaitables)


class _EventIds:
    """Event ids: 16 random hex digits per process, then a 16-digit hex counter.

    As unique as a UUID for this purpose (64 random bits tell processes apart, the
    counter tells events apart) at a tenth of the cost of ``uuid4()``, which reads
    ``os.urandom`` for every event. A forked child draws a prefix of its own.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


#: ``new_event_id()`` returns a new unique event id (32 hex characters).
new_event_id = _EventIds()
os.register_at_fork(after_in_child=new_event_id.reseed)
