"""Channel-name validation, done before any SQL is sent."""

from __future__ import annotations

from typing import Any

from pgbus.errors import InvalidChannel

#: PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
MAX_CHANNEL_BYTES = 63

#: NOTIFY refuses payloads of this many bytes or more.
MAX_PAYLOAD_BYTES = 8000


def check_channel(channel: Any) -> str:
    """Return ``channel`` if PostgreSQL accepts it unchanged as a channel name.

    :param channel: the candidate name.
    :returns: the same name.
    :raises InvalidChannel: when it is not a ``str``, is empty, contains NUL or is longer
        than 63 bytes in UTF-8 (``LISTEN`` would silently truncate it).
    """
    if not isinstance(channel, str):
        raise InvalidChannel(f"channel must be a str, not {type(channel).__name__}")
    if not channel:
        raise InvalidChannel("channel must not be empty")
    if "\x00" in channel:
        raise InvalidChannel(f"channel {channel!r} contains a NUL character")
    try:
        size = len(channel.encode())
    except UnicodeEncodeError as exc:
        raise InvalidChannel(f"channel {channel!r} is not valid UTF-8: {exc.reason}") from None
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            f"channel {channel!r} is {size} bytes; PostgreSQL allows at most {MAX_CHANNEL_BYTES}"
        )
    return channel
