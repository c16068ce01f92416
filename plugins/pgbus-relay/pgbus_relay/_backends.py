"""The broker side of a relay: one record, one small interface, one class per broker.

A backend connects, sends one :class:`Record` and returns once the broker acknowledged
it (stored it durably, as far as that broker can say), and closes. It tells two kinds
of failure apart, because the relay treats them differently:

* :class:`BrokerUnavailable`: the broker cannot be reached or did not answer in time.
  The relay waits (the bus's ``pgbus_reconnect_backoff`` hook) and sends again; the
  journal position does not move meanwhile.
* :class:`BrokerRejected`: the broker refused this record (too large, say). Sending it
  again would fail again: the relay dead-letters it with the broker's error and goes on.
* :class:`BrokerMisconfigured` (a :class:`BrokerUnavailable`): the broker refuses the
  relay's setup (a stream's subjects). The relay waits as for an outage, but logs it
  once as a configuration error.

A backend shows its URL only through :func:`public_url` (no password or token), and
may refuse, when the relay is made, topics it could never take (``check_topics``).

Adding a broker (RabbitMQ with publisher confirms, Redis Streams' ``XADD``) is one class
with these three methods and one :func:`register_backend` call for its URL scheme.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from pgbus import ConfigError, PgbusError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from urllib.parse import SplitResult


class BrokerUnavailable(PgbusError):  # noqa: N818 - reads as the condition it is
    """The broker cannot take records now (down, unreachable, timed out): try again later.

    .. versionadded:: 0.1.0
    """


class BrokerRejected(PgbusError):  # noqa: N818 - reads as the condition it is
    """The broker refused this record for good (too large, invalid): dead-letter it.

    ``str(error)`` is the broker's own error.

    .. versionadded:: 0.1.0
    """


class BrokerMisconfigured(BrokerUnavailable):
    """The broker refuses the relay's setup (a stream's subjects, say): fix the configuration.

    The relay waits as for :class:`BrokerUnavailable` (the events stay in the journal and
    go out once the broker or the relay is fixed), but logs it once as an error.

    .. versionadded:: 0.1.0
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One event as the broker gets it.

    :ivar topic: the Kafka topic or NATS subject (the relay's ``topic`` template, filled).
    :ivar value: the message body: the envelope's ``data``, as JSON.
    :ivar key: the record key (the ``key`` field of the payload), if any.
    :ivar event_id: the event's id (``Nats-Msg-Id`` on JetStream, a header everywhere).
    :ivar headers: the message headers (the envelope's, and ``pgbus-*``).

    .. versionadded:: 0.1.0
    """

    topic: str
    value: bytes
    key: bytes | None
    event_id: str
    headers: Mapping[str, str]


class Backend(Protocol):
    """What a relay needs from a broker client.

    .. versionadded:: 0.1.0
    """

    #: What this backend promises about duplicates, for the docs and ``pgbus relay status``.
    delivery: str

    async def connect(self, topics: Sequence[str]) -> None:
        """Connect; called before the first send, until it succeeds.

        :param topics: the topics the relay sends to, as far as known, as NATS subject
            patterns: a template field other than ``{channel}`` is ``*`` (one token),
            or ``>`` when it is the whole last token (a dotted event type fills
            several): a backend may create what is missing (JetStream: the stream's
            subjects).
        :raises BrokerUnavailable: when the broker cannot be reached.
        :raises BrokerMisconfigured: when it refuses the relay's setup.
        """

    async def send(self, record: Record) -> None:
        """Send ``record`` and return once the broker acknowledged it.

        :raises BrokerUnavailable: when it may succeed later.
        :raises BrokerRejected: when the broker refused the record itself.
        """

    async def close(self) -> None:
        """Flush and disconnect (idempotent)."""


#: URL scheme -> ``"module:factory"``; a factory takes the split URL and returns a backend.
BACKENDS: dict[str, str] = {
    "kafka": "pgbus_relay._kafka:KafkaBackend",
    "nats": "pgbus_relay._nats:JetStreamBackend",
}

#: URL scheme -> the extra of pgbus-relay that installs its client.
EXTRAS = {"kafka": "kafka", "nats": "nats"}


def register_backend(scheme: str, factory: str) -> None:
    """Relay to URLs of ``scheme`` with the backend ``factory`` (``"module:callable"``).

    ``factory(url)`` gets the :func:`urllib.parse.urlsplit` result and returns a
    :class:`Backend`; it is imported when a relay to such a URL is made.

    .. versionadded:: 0.1.0
    """
    BACKENDS[scheme] = factory


def backend_for(url: str) -> Backend:
    """The backend of ``url`` (``kafka://host:port``, ``nats://host:port?stream=NAME``).

    :raises ConfigError: for an unknown scheme, a URL without a host, or a missing client.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # a bad IPv6 address; its text may hold the URL
        raise ConfigError(f"relay: cannot parse {public_url(url)!r}") from None
    path = BACKENDS.get(parts.scheme)
    if path is None:
        known = ", ".join(f"{scheme}://" for scheme in sorted(BACKENDS))
        raise ConfigError(
            f"relay: cannot relay to {public_url(url)!r}: the supported brokers are {known}"
        )
    if not hostname:
        raise ConfigError(f"relay: {public_url(url)!r} names no host")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = EXTRAS.get(parts.scheme, parts.scheme)
        raise ConfigError(
            f"relay: {parts.scheme}:// needs its client: pip install 'pgbus-relay[{extra}]' ({exc})"
        ) from exc
    factory: Callable[[SplitResult], Backend] = getattr(module, attr)
    return factory(parts)


#: A query parameter that may hold a secret (its value is hidden by :func:`public_url`).
_SECRET_PARAM = re.compile(
    r"(?P<head>(?:^|[?&;])(?:[^=&#;]*(?:password|passwd|pass|token|secret|key)[^=&#;]*)=)[^&#;]*",
    re.IGNORECASE,
)


def public_url(url: str) -> str:
    """``url`` without its secrets, wherever it is shown: errors, logs, reprs, the status.

    ``user:password@`` keeps the user (``user:***@``); a lone userinfo is a token
    (``nats://TOKEN@host``) and becomes ``***@``; the values of query parameters whose
    names hold ``password``, ``pass``, ``token``, ``secret`` or ``key`` become ``***``.
    Everything before the last ``@`` counts as userinfo, so a password with an unquoted
    ``/``, ``?`` or ``#`` is hidden too.

    .. versionadded:: 0.1.0
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    userinfo, at, after = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:***" if colon and not set(user) & set("/?#") else "***"
        rest = f"{shown}@{after}"
    base, question, query = rest.partition("?")
    return head + sep + base + question + _SECRET_PARAM.sub(r"\g<head>***", query)


def credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    """The percent-decoded user and password of a URL's userinfo (``None`` when absent).

    ``user:password@`` gives both; a lone ``user@`` gives ``(user, None)`` (for NATS, a
    token).
    """
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return unquote(user), unquote(password) if colon else None


def hosts(parts: SplitResult, default_port: int) -> list[str]:
    """``host:port`` of each server a URL names (``kafka://a:9092,b:9092``)."""
    found = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.partition(":")
        found.append(f"{host}:{port or default_port}")
    return found
