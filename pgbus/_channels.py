"""Channel-name validation, done before any SQL is sent."""

from __future__ import annotations

from typing import Any

from pgbus._identifiers import MAX_IDENTIFIER_BYTES, check_identifier
from pgbus.errors import InvalidChannel

#: PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes: channels are identifiers.
MAX_CHANNEL_BYTES = MAX_IDENTIFIER_BYTES

#: NOTIFY refuses payloads of this many bytes or more.
MAX_PAYLOAD_BYTES = 8000


def check_channel(channel: Any) -> str:
    """Return ``channel`` if PostgreSQL accepts it unchanged as a channel name.

    :param channel: the candidate name.
    :returns: the same name.
    :raises InvalidChannel: when it is not a ``str``, is empty, contains NUL or is longer
        than 63 bytes in UTF-8 (``LISTEN`` would silently truncate it).
    """
    return check_identifier(channel, "channel", InvalidChannel)
