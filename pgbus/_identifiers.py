"""PostgreSQL identifiers: the one check of a name, and its quoting, done before any SQL.

Channels, schemas, tables, columns and triggers are all identifiers to PostgreSQL, with
the same limits; :func:`check_identifier` is the single place that knows them, and
every caller (channels, change triggers, the durable schema) raises the same
:class:`~pgbus.InvalidIdentifier` (or its :class:`~pgbus.InvalidChannel`).
"""

from __future__ import annotations

from typing import Any

from pgbus.errors import InvalidIdentifier

#: PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
MAX_IDENTIFIER_BYTES = 63


def check_identifier(
    name: Any, what: str = "identifier", error: type[InvalidIdentifier] = InvalidIdentifier
) -> str:
    """Return ``name`` if PostgreSQL can use it unchanged as a quoted identifier.

    :param name: the candidate name (a channel, table, schema, column or trigger name).
    :param what: what the name is, for the error message.
    :param error: the error to raise: :class:`~pgbus.InvalidIdentifier` or a subclass
        (:class:`~pgbus.InvalidChannel` for channels).
    :returns: the same name.
    :raises InvalidIdentifier: when it is not a ``str``, is empty, contains NUL or is over
        63 bytes in UTF-8 (PostgreSQL would silently truncate it).

    .. versionadded:: 0.1.0
    """
    if not isinstance(name, str):
        raise error(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise error(f"{what} must not be empty")
    if "\x00" in name:
        raise error(f"{what} {name!r} contains a NUL character")
    try:
        size = len(name.encode())
    except UnicodeEncodeError as exc:
        raise error(f"{what} {name!r} is not valid UTF-8: {exc.reason}") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise error(
            f"{what} {name!r} is {size} bytes; PostgreSQL allows at most {MAX_IDENTIFIER_BYTES}"
        )
    return name


def quote_ident(name: str) -> str:
    """Quote ``name`` as a PostgreSQL identifier, always (``"…"``, with ``"`` doubled).

    Unlike PostgreSQL's ``quote_ident()``, it quotes even names that would not need it,
    so the name is used exactly as given: case, spaces, quotes and all.

    :param name: the identifier.
    :returns: the quoted identifier, safe to put into SQL text.
    :raises InvalidIdentifier: for a name :func:`check_identifier` refuses.

    .. versionadded:: 0.1.0
    """
    check_identifier(name)
    return '"' + name.replace('"', '""') + '"'
