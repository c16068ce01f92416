"""Small helpers shared by the bus, the listener and the publisher."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import asyncpg

if TYPE_CHECKING:
    from collections.abc import Callable

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

#: The connection parameters that hold secrets (libpq's names; compared case-blind).
_SECRET_KEYS = frozenset({"password", "sslpassword"})
_URL = re.compile(r"(?P<scheme>\s*[a-z][a-z0-9+.-]*://)(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
#: ``user:password@`` (the password up to the last ``@`` of the authority).
_USERINFO = re.compile(r"^(?P<user>[^:/@?#]*):[^/?#]*@")
#: One ``key=value`` of a URL's query string; the key may be percent-encoded.
_QUERY_PARAM = re.compile(r"(?P<head>(?:^|[?&;])(?P<key>[^=&#;]*)=)[^&#;]*")
#: One ``key=value`` of a keyword DSN: the value quoted (``'x \\' y'``) or bare.
_KEYWORD = re.compile(
    r"(?P<head>(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*)(?:'(?:[^'\\]|\\.)*(?:'|$)|(?:[^\s'\\]|\\.)+)",
    re.DOTALL,
)


async def keep_session(_conn: asyncpg.Connection) -> None:
    """The ``reset`` of pgbus's own pools: nothing to undo between two uses.

    Their connections only run statements that leave no session state behind (NOTIFY,
    DDL and queries inside transactions, transaction-level advisory locks).
    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``) would cost a second round trip on every release, which halves the
    rate of single publishes; asyncpg still rolls back a transaction left open.
    """


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with every secret replaced by ``***``, for reprs, logs and errors.

    The one redaction pgbus uses wherever a DSN may be shown. It covers each form
    libpq and asyncpg take: the password of a URL's userinfo
    (``postgresql://u:***@h/db``), the ``password`` and ``sslpassword`` query
    parameters (any case, percent-encoded or not) and the same keywords in a keyword DSN
    (``host=h password=*** sslpassword=***``, quoted values included).
    """
    url = _URL.match(dsn)
    if url is None:
        return _KEYWORD.sub(_redact_match(lambda key: key), dsn)
    rest = _USERINFO.sub(r"\g<user>:***@", url["rest"], count=1)
    base, sep, query = rest.partition("?")
    return url["scheme"] + base + sep + _QUERY_PARAM.sub(_redact_match(unquote), query)


def _redact_match(decode: Callable[[str], str]) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` replacement: ``***`` for the value of a secret key, else unchanged."""

    def replace(match: re.Match[str]) -> str:
        if decode(match["key"]).strip().lower() in _SECRET_KEYS:
            return match["head"] + "***"
        return match[0]

    return replace


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
    """Event ids: 32 lowercase hex digits (128 bits), each drawn from ``os.urandom``.

    Unpredictable (seeing some ids tells nothing about the next) and still cheap: the
    random bytes are read in blocks of :data:`_IDS_PER_BLOCK` ids, hexed and sliced
    once, then handed out by ``list.pop``, which is atomic: no lock is needed across
    threads (two threads refilling at once waste a block, never repeat an id). It costs
    less than the one id it replaces (a random prefix and a counter, which anyone who
    saw one id could continue) and a tenth of ``uuid4()``. A forked child throws the
    parent's unused ids away: it would otherwise hand out the same ones.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []

    def reseed(self) -> None:
        """Forget the ids in hand (in a forked child: they are the parent's too)."""
        self._ids = []

    def __call__(self) -> str:
        try:
            return self._ids.pop()
        except IndexError:
            block = os.urandom(16 * _IDS_PER_BLOCK).hex()
            ids = self._ids = [block[i : i + 32] for i in range(0, len(block), 32)]
            return ids.pop()


#: How many ids one read of ``os.urandom`` provides.
_IDS_PER_BLOCK = 256

#: ``new_event_id()`` returns a new unpredictable event id (32 lowercase hex characters).
new_event_id = _EventIds()
os.register_at_fork(after_in_child=new_event_id.reseed)
