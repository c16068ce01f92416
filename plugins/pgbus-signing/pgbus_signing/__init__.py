"""Signed pgbus envelopes: only publishers holding a key are believed.

Any PostgreSQL role that can connect can ``NOTIFY`` any channel, so a listener cannot
tell a trusted publisher from anyone else with a ``psql`` prompt. This plugin signs
every payload a bus publishes with HMAC-SHA256 and makes every bus that has it verify
what it receives. A notification that is unsigned, signed with an unknown key,
tampered with, too old (or from the future), or a replay of one already accepted is
rejected through the decode-failure path: :func:`~pgbus.hookspecs.pgbus_on_decode_error`
is called, it is counted as a decode failure and kept as a dead letter, and no handler
(typed or untyped) sees it.

On the wire the signature is one more member at the end of the JSON payload the
encoder produced (the pgbus envelope, or another codec's JSON object)::

    {"v":1,"type":"OrderPlaced","id":"…","ts":…,"data":{…},"sig":"v1:k2:1732530000250:…"}

``sig`` is ``v1:<key id>:<unix ms>:<base64url HMAC>``, the HMAC being taken over
``v1``, the key id, the time, the channel and the exact payload before ``sig`` was
added, so that a signature is bound to its channel and moment. Receivers that do not
verify (the built-in codec ignores unknown members) still decode signed payloads.

An event read from the durable journal (:attr:`pgbus.Message.stored_at` is set) is
judged by when it was journaled, not by when it is delivered, is not subject to the
replay window (journal rows are delivered again by design; their unique event id
stands against replays), and its envelope id must be the row's event id.

Configure it with keyword arguments::

    bus = pgbus.Bus(dsn, plugins=[SigningPlugin(keys={"k2": new, "k1": old}, key_id="k2")])

or, when it is loaded from its entry point, with environment variables:
``PGBUS_SIGNING_KEYS="k2:secret2,k1:secret1"``, ``PGBUS_SIGNING_KEY_ID=k2`` (default: the
first key), ``PGBUS_SIGNING_MAX_AGE=300`` and ``PGBUS_SIGNING_CHANNELS=orders,payments``
(default: every channel). Without keys it does nothing, so installing it never breaks
a bus that did not ask for it.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Final

import pgbus
from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping, Sequence

    from pgbus.types import Decoder, Encoder, Outgoing, Router

__all__ = ["SIGNATURE_HEADER", "SignatureError", "SigningPlugin", "plugin"]
__version__ = "0.1.0"

logger = logging.getLogger(__name__)

#: The name the entry point registers the plugin under.
NAME: Final = "signing"
#: The header a verified :class:`~pgbus.Delivery` carries: the id of the key that signed it.
SIGNATURE_HEADER: Final = "pgbus-signed-by"
#: Seconds a signature stays acceptable by default (and the largest clock skew tolerated).
DEFAULT_MAX_AGE: Final = 300.0

_VERSION = "v1"
_MARKER = ',"sig":"'
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SIG = re.compile(r"v1:([A-Za-z0-9._-]{1,64}):([0-9]{1,15}):([A-Za-z0-9_-]{43})")
#: Most rejected messages remembered between the decoder and the router (see _Rejected).
_MAX_REJECTED = 1024
#: Most accepted signatures remembered per channel to refuse replays within max_age.
_MAX_SEEN = 100_000


class SignatureError(pgbus.DecodeError):
    """A notification whose signature is missing, unknown, wrong, expired or replayed.

    A :class:`pgbus.DecodeError`, so it takes the bus's decode-failure path.

    :ivar channel: the channel it arrived on.
    :ivar payload: the raw payload, as received.
    :ivar reason: why it was rejected, e.g. ``"no signature"``.

    .. versionadded:: 0.1.0
    """


def _as_bytes(secret: str | bytes) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode()


def _parse_keys(text: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        kid, sep, secret = item.strip().partition(":")
        if not sep or not secret:
            raise pgbus.ConfigError("PGBUS_SIGNING_KEYS is a comma-separated list of key_id:secret")
        keys[kid] = secret.encode()
    return keys


def _id_of(payload: str) -> object:
    """The ``id`` member of a JSON object payload (what an untyped decoder leaves unread)."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return obj.get("id") if isinstance(obj, dict) else None


class _Replayed(Exception):  # noqa: N818 - private control flow, turned into a SignatureError
    """A signature accepted before."""


class _Rejected:
    """The messages the decoder rejected, until the router sees them (then dropped).

    After a decode failure the bus still routes a bare delivery to the channel's untyped
    subscriptions; a forged notification must reach nobody, so the router asks here.
    """

    def __init__(self) -> None:
        self._messages: dict[int, pgbus.Message] = {}

    def add(self, message: pgbus.Message) -> None:
        messages = self._messages
        if len(messages) >= _MAX_REJECTED:  # e.g. the durable consumer, which never routes
            del messages[next(iter(messages))]
        messages[id(message)] = message

    def pop(self, message: pgbus.Message) -> bool:
        return self._messages.pop(id(message), None) is message

    def __bool__(self) -> bool:
        return bool(self._messages)


class SigningPlugin:
    """Sign what the bus publishes; accept only what a known key signed, recently.

    :param keys: the accepted keys, ``{key_id: secret}``. Several keys allow rotation:
        listeners accept all of them while publishers sign with ``key_id``. ``None``
        reads ``PGBUS_SIGNING_KEYS`` (``"k2:secret2,k1:secret1"``) when the bus is
        configured; no keys at all turns the plugin off.
    :param key_id: the key new payloads are signed with (default:
        ``PGBUS_SIGNING_KEY_ID``, else the first key).
    :param max_age: seconds a signature is accepted after it was made; signatures dated
        more than ``max_age`` in the future are refused too. Default
        ``PGBUS_SIGNING_MAX_AGE``, else 300.
    :param channels: only sign and verify on these channels (default:
        ``PGBUS_SIGNING_CHANNELS``, else every channel).
    :param reject_duplicates: also refuse a signature already accepted on this bus
        within ``max_age`` (a replay inside the window).
    :param clock: returns the current time in seconds (tests pass a fake one).
    :raises ConfigError: for a bad key id, an empty secret, an unknown ``key_id`` or a
        non-positive ``max_age``.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        keys: Mapping[str, str | bytes] | None = None,
        *,
        key_id: str | None = None,
        max_age: float | None = None,
        channels: Iterable[str] | None = None,
        reject_duplicates: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._explicit = keys is not None
        self._keys: dict[str, bytes] = {}
        self._key_id: str | None = None
        self._channels: frozenset[str] | None = None
        self._max_age = DEFAULT_MAX_AGE
        self._configured = False
        self.reject_duplicates = reject_duplicates
        self._clock = clock
        self._rejected = _Rejected()
        self._said_off = False
        if keys is not None:
            self._configure(keys, key_id, max_age, channels)
        else:
            self._pending = (key_id, max_age, channels)

    def _configure(
        self,
        keys: Mapping[str, str | bytes],
        key_id: str | None,
        max_age: float | None,
        channels: Iterable[str] | None,
    ) -> None:
        for kid, secret in keys.items():
            if not _KEY_ID.fullmatch(kid):
                raise pgbus.ConfigError(f"signing key id {kid!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
            if not secret:
                raise pgbus.ConfigError(f"signing key {kid!r} has an empty secret")
        self._keys = {kid: _as_bytes(secret) for kid, secret in keys.items()}
        if key_id is None and self._keys:
            key_id = next(iter(self._keys))
        if key_id is not None and key_id not in self._keys:
            raise pgbus.ConfigError(f"key_id {key_id!r} is not one of the keys")
        self._key_id = key_id
        if max_age is not None:
            if max_age <= 0:
                raise pgbus.ConfigError(f"max_age must be positive, not {max_age!r}")
            self._max_age = float(max_age)
        self._channels = frozenset(channels) if channels is not None else None
        self._configured = True

    def _configure_from_env(self) -> None:
        key_id, max_age, channels = self._pending
        env = os.environ
        keys = _parse_keys(env.get("PGBUS_SIGNING_KEYS", ""))
        if key_id is None:
            key_id = env.get("PGBUS_SIGNING_KEY_ID") or None
        if max_age is None and env.get("PGBUS_SIGNING_MAX_AGE"):
            try:
                max_age = float(env["PGBUS_SIGNING_MAX_AGE"])
            except ValueError:
                raise pgbus.ConfigError("PGBUS_SIGNING_MAX_AGE must be a number") from None
        if channels is None and env.get("PGBUS_SIGNING_CHANNELS"):
            channels = [c.strip() for c in env["PGBUS_SIGNING_CHANNELS"].split(",") if c.strip()]
        self._configure(keys, key_id, max_age, channels)
        if not self._keys and not self._said_off:
            self._said_off = True
            logger.info("pgbus-signing: no keys (PGBUS_SIGNING_KEYS), so not signing or verifying")

    @property
    def enabled(self) -> bool:
        """Whether the plugin has keys, so signs and verifies."""
        if not self._configured:
            self._configure_from_env()
        return bool(self._keys)

    @property
    def key_id(self) -> str | None:
        """The id of the key new payloads are signed with."""
        return self._key_id if self.enabled else None

    @property
    def max_age(self) -> float:
        """Seconds a signature stays acceptable."""
        return self._max_age

    def covers(self, channel: str) -> bool:
        """Whether payloads on ``channel`` are signed and verified.

        :param channel: a channel name.
        :returns: ``True`` when the plugin has keys and ``channel`` is in scope.
        """
        return self.enabled and (self._channels is None or channel in self._channels)

    # -- signing and verifying --------------------------------------------------------------

    def _mac(self, key: bytes, kid: str, ms: str, channel: str, payload: str) -> str:
        text = f"{_VERSION}\n{kid}\n{ms}\n{channel}\n{payload}".encode()
        digest = hmac.digest(key, text, "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, channel: str, payload: str, *, at: float | None = None) -> str:
        """Return ``payload`` with a signature for ``channel`` appended.

        The bus signs what it publishes by itself; call this to sign a payload sent
        another way (``bus.notify``, a ``pg_notify`` from another program).

        :param channel: the channel it will be sent on (the signature is bound to it).
        :param payload: a JSON object, as text.
        :param at: the signing time in seconds (default: now).
        :returns: the signed payload.
        :raises ConfigError: when the plugin has no keys, or ``payload`` is not a JSON
            object.
        """
        kid = self.key_id
        if kid is None:
            raise pgbus.ConfigError("pgbus-signing has no keys to sign with")
        body = payload.rstrip()
        if not (body.startswith("{") and body.endswith("}")) or body[1:-1].strip() == "":
            raise pgbus.ConfigError("only a non-empty JSON object payload can be signed")
        ms = str(round((self._clock() if at is None else at) * 1000))
        mac = self._mac(self._keys[kid], kid, ms, channel, body)
        return f'{body[:-1]}{_MARKER}{_VERSION}:{kid}:{ms}:{mac}"}}'

    def verify(self, channel: str, payload: str) -> str:
        """Check the signature of ``payload`` received on ``channel``.

        Does not remember the signature; the bus's decoder also refuses replays.

        :param channel: the channel it arrived on.
        :param payload: the payload, as received.
        :returns: the id of the key that signed it.
        :raises SignatureError: when it is unsigned, signed with an unknown key,
            tampered with, or outside ``max_age``.
        """
        kid, _, _ = self._check(channel, payload)
        return kid

    def _check(
        self, channel: str, payload: str, stored_at: float | None = None
    ) -> tuple[str, str, float]:
        """Verify; return ``(key id, mac, signing time)``.

        The age of the signature is taken at ``stored_at`` for an event read from the
        durable journal (signed within ``max_age`` of being stored), else now.
        """
        cut = payload.rfind(_MARKER)
        match = _SIG.fullmatch(payload, cut + len(_MARKER), len(payload) - 2) if cut > 0 else None
        if match is None or not payload.endswith('"}'):
            raise SignatureError(channel, payload, "no signature")
        kid, ms, mac = match.groups()
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(channel, payload, f"signed with unknown key {kid!r}")
        expected = self._mac(key, kid, ms, channel, payload[:cut] + "}")
        if not hmac.compare_digest(expected, mac):
            raise SignatureError(channel, payload, f"bad signature (key {kid!r})")
        signed_at = int(ms) / 1000
        age = (self._clock() if stored_at is None else stored_at) - signed_at
        if age > self._max_age:
            raise SignatureError(
                channel, payload, f"signature expired: {age:.0f} s old, max_age {self._max_age:g} s"
            )
        if -age > self._max_age:
            raise SignatureError(channel, payload, f"signature dated {-age:.0f} s in the future")
        return kid, mac, signed_at

    def _verifier(self, channel: str, inner: Decoder) -> Decoder:
        seen: dict[str, float] = {}  # mac -> signing time, oldest first; this decoder only
        check = self._check
        rejected = self._rejected
        duplicates = self.reject_duplicates
        remember = self._remember

        def decode(message: pgbus.Message) -> pgbus.Delivery:
            stored_at = message.stored_at
            try:
                kid, mac, signed_at = check(channel, message.payload, stored_at)
                # A journal row is delivered again by design (redelivery, a lease that
                # ran out); its unique event id, checked below, stands against replays.
                if duplicates and stored_at is None:
                    remember(seen, mac, signed_at)
            except SignatureError:
                rejected.add(message)
                raise
            except _Replayed:
                rejected.add(message)
                raise SignatureError(
                    channel, message.payload, "replayed: this signature was already accepted"
                ) from None
            delivery = inner(message)
            if stored_at is not None:
                signed_id = delivery.id if delivery.id is not None else _id_of(message.payload)
                if signed_id != message.stored_id:
                    rejected.add(message)
                    raise SignatureError(
                        channel,
                        message.payload,
                        f"the signed event id {signed_id!r} is not the journal row's"
                        f" {message.stored_id!r}",
                    )
            headers = dict(delivery.headers)
            headers[SIGNATURE_HEADER] = kid
            delivery.headers = headers
            return delivery

        return decode

    def _remember(self, seen: dict[str, float], mac: str, signed_at: float) -> None:
        """Record an accepted signature; raise when it was accepted before (a replay)."""
        if mac in seen:
            raise _Replayed
        horizon = self._clock() - self._max_age
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= horizon and len(seen) < _MAX_SEEN:
                break
            del seen[oldest]
        seen[mac] = signed_at

    # -- hooks ----------------------------------------------------------------------------

    @hookimpl
    def pgbus_configure(self, bus: pgbus.Bus) -> None:
        """Read the environment (unless configured in code); replace an entry-point twin."""
        if not self._explicit:
            self._configure_from_env()
        if self is plugin:
            return
        for name, other, origin, _hooks in bus.plugins.list():
            if other is not self and origin == "entry point" and isinstance(other, SigningPlugin):
                bus.plugins.unregister(name)
                logger.info(
                    "pgbus-signing: the plugin passed in code replaces entry point %r", name
                )

    @hookimpl(wrapper=True, tryfirst=True)
    def pgbus_encoder(self, event_type: type[pgbus.Event]) -> Generator[None, Encoder | None, Any]:
        """Wrap whichever encoder wins: sign its payload."""
        inner = yield
        channel = event_type.pgbus_channel
        if inner is None or channel is None or not self.covers(channel):
            return inner
        sign = self.sign

        def encode(out: Outgoing) -> str:
            return sign(out.channel, inner(out))

        return encode

    @hookimpl(wrapper=True, tryfirst=True)
    def pgbus_decoder(self, channel: str) -> Generator[None, Decoder | None, Any]:
        """Wrap whichever decoder wins: verify before it decodes."""
        inner = yield
        if inner is None or not self.covers(channel):
            return inner
        return self._verifier(channel, inner)

    @hookimpl(wrapper=True, tryfirst=True)
    def pgbus_router(self, channel: str) -> Generator[None, Router | None, Any]:
        """Wrap whichever router wins: a rejected notification goes nowhere."""
        inner = yield
        if inner is None or not self.covers(channel):
            return inner
        rejected = self._rejected

        def route(delivery: pgbus.Delivery) -> Sequence[pgbus.Subscription]:
            if delivery.event is None and rejected and rejected.pop(delivery.message):
                return ()
            return inner(delivery)

        return route


#: The instance the ``pgbus`` entry point registers (configured from the environment).
plugin = SigningPlugin()
