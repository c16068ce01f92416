"""Who may change things: the token, login sessions, and the cross-site request checks.

Reading needs nothing. A change (redeliver, discard, seek, drop) needs the token, either
as ``Authorization: Bearer TOKEN`` (scripts: a browser never adds that header on its
own, so no cross-site check is needed) or as a session a login form opened with it (an
``HttpOnly``, ``SameSite=Strict`` cookie). A session's request must also come from the
dashboard's own pages: its ``Origin`` (or ``Sec-Fetch-Site``) must say so, and it must
carry the session's CSRF token (a form field, or the ``X-CSRF-Token`` header).
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.requests import Request

#: The name of the session cookie.
COOKIE = "pgbus_dashboard"

#: How many login sessions are kept (the oldest is forgotten past this).
MAX_SESSIONS = 1000


class Refused(Exception):  # noqa: N818 - a refusal, not an error of the dashboard
    """A change was not allowed: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Guard:
    """The token, the sessions opened with it, and the checks every change goes through.

    :param token: the token; ``None``: nothing can be changed (log in is refused).
    :param read_only: refuse every change, whatever the token.
    """

    def __init__(self, token: str | None, *, read_only: bool) -> None:
        self._token = token
        self.read_only = read_only
        self._sessions: dict[str, str] = {}  # session id -> its CSRF token

    @property
    def can_change(self) -> bool:
        """Whether changes are possible at all (a token, and not read-only)."""
        return self._token is not None and not self.read_only

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the token (compared in constant time)."""
        return self._token is not None and hmac.compare_digest(given.encode(), self._token.encode())

    def open_session(self) -> tuple[str, str]:
        """A new session: its id (the cookie's value) and its CSRF token."""
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._sessions[session] = csrf
        return session, csrf

    def close_session(self, request: Request) -> None:
        """Forget the request's session, if any."""
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)

    def csrf(self, request: Request) -> str | None:
        """The CSRF token of the request's session; ``None`` without a valid one."""
        return self._sessions.get(request.cookies.get(COOKIE, ""))

    def check(self, request: Request, form: Mapping[str, object] | None = None) -> str:
        """Allow a change, or raise :class:`Refused`; returns how it was authorised.

        :param form: the submitted form, for its ``csrf`` field.
        :raises Refused: 403 read-only or without a token configured, 401 without
            credentials, 403 for a cross-site request or a missing CSRF token.
        """
        if self.read_only:
            raise Refused(403, "the dashboard runs --read-only: nothing can be changed")
        if self._token is None:
            raise Refused(403, "the dashboard runs without --token: nothing can be changed")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            if self.token_matches(given.strip()):
                return "bearer token"
            raise Refused(401, "wrong bearer token")
        expected = self.csrf(request)
        if expected is None:
            raise Refused(401, "log in with the token first (or send Authorization: Bearer)")
        if not same_origin(request):
            raise Refused(403, "cross-site request refused")
        sent = request.headers.get("x-csrf-token") or str((form or {}).get("csrf", ""))
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise Refused(403, "missing or wrong CSRF token")
        return "session"


def same_origin(request: Request) -> bool:
    """Whether a browser says the request comes from the dashboard's own pages.

    ``Sec-Fetch-Site`` when the browser sends it, else ``Origin`` (or, without either,
    ``Referer``) compared with the request's own scheme and host.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in {"same-origin", "none"}
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer", "")
    return referer == own or referer.startswith(own + "/")
