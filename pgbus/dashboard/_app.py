"""The dashboard's ASGI application: pages, their fragments, the JSON API and the actions."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import asyncpg
import click
import jinja2
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pgbus._metrics_publisher import METRICS_CHANNEL
from pgbus.cli._doctor import diagnose
from pgbus.cli.durable import _position
from pgbus.dashboard._auth import COOKIE, Guard, Refused
from pgbus.dashboard._data import Collector, durable_view
from pgbus.dashboard._plots import plot
from pgbus.durable import (
    DEFAULT_SCHEMA,
    SchemaError,
    discard,
    drop_subscription,
    list_dead_letters,
    redeliver,
    seek,
)
from pgbus.errors import PgbusError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from pgbus.cli._doctor import Check

logger = logging.getLogger(__name__)

#: The headers of every response: no inline script, no framing, nothing from elsewhere.
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        (
            b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
            b" object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        ),
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)

#: Seconds a health report is reused (it opens connections and waits for a NOTIFY).
HEALTH_CACHE_SECONDS = 5.0
#: How many notices of actions are kept for the pages after them.
NOTICES_KEPT = 64
#: The largest id PostgreSQL's ``bigint`` holds.
BIGINT_MAX = 2**63 - 1


class _SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclasses.dataclass(slots=True)
class Settings:
    """How the dashboard was started (see :func:`create_app`)."""

    dsn: str
    token: str | None
    read_only: bool
    schema: str
    metrics_channel: str
    window: float
    refresh: float
    timeout: float


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:  # noqa: PLR2004 - a minute
        return f"{seconds:.1f} s"
    if seconds < 3600:  # noqa: PLR2004 - an hour
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(value: float | None) -> str:
    return "…" if value is None else f"{value:,.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:  # noqa: PLR2004 - below a millisecond
        return f"{value * 1e6:,.0f} µs"
    return f"{value * 1000:,.1f} ms"


#: The plots of each bus: title, ``(label, Point attribute)`` of each line, value format.
BUS_PLOTS: tuple[tuple[str, tuple[tuple[str, str], ...], Callable[[float], str]], ...] = (
    ("events / s", (("received", "received"), ("handled", "handled"), ("errors", "errors")), _rate),
    (
        "lag and handler time",
        (("lag avg", "lag_avg"), ("lag max", "lag_max"), ("handler avg", "handler_avg")),
        _ms,
    ),
)


def _json(value: Any) -> Any:
    """``value`` made of JSON types (dataclasses, datetimes and tuples converted)."""
    return json.loads(json.dumps(value, default=str))


class Dashboard:
    """The state behind the routes: settings, the guard, the pool and the collector."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = Guard(settings.token, read_only=settings.read_only)
        self.collector = Collector(
            settings.dsn,
            settings.metrics_channel,
            window=settings.window,
            interval=settings.refresh,
        )
        self._pool: asyncpg.Pool | None = None
        self._health: tuple[float, list[Check]] | None = None
        #: What the last actions did, by an unguessable key the redirect after each carries
        #: (a text in the URL would let any link show a notice of its own on the page).
        self._notices: collections.OrderedDict[str, str] = collections.OrderedDict()
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("pgbus.dashboard", "templates"),
            autoescape=True,  # every value is escaped, payloads and errors included
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(rate=_rate, ms=_ms, ago=_ago)
        self.templates = Jinja2Templates(env=env)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Open the pool and start the collector; close both at shutdown."""
        self._pool = await asyncpg.create_pool(
            self.settings.dsn, min_size=1, max_size=4, timeout=self.settings.timeout
        )
        try:
            await self.collector.start(self._pool)
            try:
                yield
            finally:
                await self.collector.stop()
        finally:
            await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool of the pages (open while the app runs)."""
        if self._pool is None:
            raise RuntimeError("the dashboard is not running (lifespan not started)")
        return self._pool

    # -- the data of each page -------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """The overview's figures: every live bus with its plots, and the queue usage."""
        now = time.time()
        window = self.settings.window
        buses = []
        for name, entry in self.collector.buses().items():
            history = entry["history"]
            plots = [
                plot(
                    title,
                    {label: [(p.ts, getattr(p, attr)) for p in history] for label, attr in lines},
                    now=now,
                    window=window,
                    fmt=fmt,
                )
                for title, lines, fmt in BUS_PLOTS
            ]
            buses.append({"id": name, "snapshot": entry["snapshot"], "plots": plots})
        usage = list(self.collector.queue_usage)
        queue = plot(
            "pg_notification_queue_usage()",
            {"usage": [(t, u * 100) for t, u in usage]},
            now=now,
            window=window,
            fmt=lambda v: f"{v:.2f} %",
        )
        return {
            "buses": buses,
            "queue_usage": usage[-1][1] if usage else None,
            "queue_plot": queue,
            "channel": self.settings.metrics_channel,
        }

    async def health(self) -> list[Check]:
        """The ``pgbus doctor`` report, reused for :data:`HEALTH_CACHE_SECONDS`."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_CACHE_SECONDS:
            checks = await diagnose(self.settings.dsn, self.settings.timeout, self.settings.schema)
            self._health = (now, checks)
        return self._health[1]

    # -- rendering -------------------------------------------------------------------------

    def notice(self, text: str) -> str:
        """Keep ``text`` (what an action did) for the page after it; return its key."""
        key = secrets.token_urlsafe(12)
        self._notices[key] = text
        while len(self._notices) > NOTICES_KEPT:
            self._notices.popitem(last=False)
        return key

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """Render template ``name`` with what every page needs besides ``context``."""
        csrf = self.guard.csrf(request)
        context.setdefault("message", self._notices.get(request.query_params.get("done", "")))
        context.setdefault("error", None)
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "settings": self.settings,
                "can_change": self.guard.can_change,
                "logged_in": csrf is not None,
                "csrf": csrf or "",
                "refresh_ms": int(self.settings.refresh * 1000),
                **context,
            },
            status_code=status,
        )


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _form(request: Request) -> dict[str, list[str]]:
    """The submitted ``application/x-www-form-urlencoded`` form (each field a list)."""
    body = (await request.body()).decode("utf-8", "replace")
    return parse_qs(body, keep_blank_values=True)


async def _json_params(request: Request) -> dict[str, list[Any]]:
    """The JSON object of an API request, each field a list (as in a form)."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    return {k: v if isinstance(v, list) else [v] for k, v in body.items()}


def _ids(params: dict[str, Any]) -> list[int]:
    """The dead letters an action names (at least one), or :class:`Refused` (400)."""
    try:
        ids = sorted({int(v) for v in params.get("ids") or []})
    except (TypeError, ValueError):
        raise Refused(400, "ids must be whole numbers") from None
    if not ids:
        raise Refused(400, "choose at least one dead letter")
    if ids[0] < 1 or ids[-1] > BIGINT_MAX:
        raise Refused(400, "no such dead letter (ids are whole numbers from 1)")
    return ids


def _routes(board: Dashboard) -> list[Route | Mount]:  # noqa: C901, PLR0915 - one closure per route
    schema = board.settings.schema

    async def overview_page(request: Request) -> Response:
        return board.render(request, "overview.html", page="overview", **board.overview())

    async def overview_fragment(request: Request) -> Response:
        return board.render(request, "_overview.html", **board.overview())

    async def overview_api(_request: Request) -> Response:
        data = board.overview()
        return JSONResponse(
            _json(
                {
                    "buses": {
                        name: {
                            "snapshot": entry["snapshot"],
                            "history": [dataclasses.asdict(p) for p in entry["history"]],
                        }
                        for name, entry in board.collector.buses().items()
                    },
                    "queue_usage": data["queue_usage"],
                }
            )
        )

    async def durable_data() -> Any:
        async with board.pool.acquire() as conn:
            return await durable_view(conn, schema)

    async def durable_page(request: Request) -> Response:
        return board.render(request, "durable.html", page="durable", view=await durable_data())

    async def durable_fragment(request: Request) -> Response:
        return board.render(request, "_durable.html", view=await durable_data())

    async def durable_api(_request: Request) -> Response:
        return JSONResponse(_json(dataclasses.asdict(await durable_data())))

    def filters(request: Request) -> dict[str, Any]:
        query = request.query_params
        limit = query.get("limit") or "100"
        return {
            "subscription": query.get("subscription") or None,
            "channel": query.get("channel") or None,
            "error": query.get("error") or None,
            "include_redelivered": query.get("all") in {"1", "true", "on"},
            "limit": min(max(int(limit), 1), 1000) if limit.isascii() and limit.isdigit() else 100,
        }

    async def letters(request: Request) -> tuple[dict[str, Any], list[Any] | None, str | None]:
        chosen = filters(request)
        try:
            async with board.pool.acquire() as conn:
                rows = await list_dead_letters(conn, schema, **chosen)
        except SchemaError as exc:
            return chosen, None, str(exc)
        return chosen, rows, None

    async def dead_letters_page(request: Request) -> Response:
        chosen, rows, problem = await letters(request)
        return board.render(
            request,
            "dead_letters.html",
            page="dead-letters",
            filters=chosen,
            rows=rows,
            problem=problem,
            query=str(request.query_params),
        )

    async def dead_letters_api(request: Request) -> Response:
        _chosen, rows, problem = await letters(request)
        if rows is None:
            return JSONResponse({"error": problem}, status_code=409)
        return JSONResponse(_json([dataclasses.asdict(row) for row in rows]))

    async def health_page(request: Request) -> Response:
        return board.render(request, "health.html", page="health", checks=await board.health())

    async def health_fragment(request: Request) -> Response:
        return board.render(request, "_health.html", checks=await board.health())

    async def health_api(_request: Request) -> Response:
        checks = await board.health()
        return JSONResponse(
            {
                "ok": all(c.status != "fail" for c in checks),
                "checks": [dataclasses.asdict(c) for c in checks],
            }
        )

    # -- logging in ------------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        return board.render(request, "login.html", page="login", next=_next(request))

    async def login(request: Request) -> Response:
        form = await _form(request)
        target = _safe_next((form.get("next") or ["/"])[0])
        if not board.guard.can_change:
            return board.render(
                request,
                "login.html",
                status=403,
                page="login",
                next=target,
                error="this dashboard cannot change anything (read-only, or no --token)",
            )
        if not board.guard.token_matches((form.get("token") or [""])[0]):
            logger.warning("dashboard login refused (wrong token) from %s", _client(request))
            return board.render(
                request, "login.html", status=401, page="login", next=target, error="wrong token"
            )
        session, _csrf = board.guard.open_session()
        logger.info("dashboard login from %s", _client(request))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            session,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        board.guard.close_session(request)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- the actions -----------------------------------------------------------------------

    async def do_redeliver(params: dict[str, Any]) -> tuple[str, Any]:
        ids = _ids(params)
        async with board.pool.acquire() as conn:
            outcome = await redeliver(conn, ids, schema)
        done = [i for i, what in outcome.items() if what in {"inbox", "notify"}]
        text = f"redelivered dead letters {done}" if done else "redelivered nothing"
        failed = {i: what for i, what in outcome.items() if i not in done}
        if failed:
            text += "; not redelivered: " + ", ".join(f"{i} ({w})" for i, w in failed.items())
        return text, {"outcome": {str(k): v for k, v in outcome.items()}}

    async def do_discard(params: dict[str, Any]) -> tuple[str, Any]:
        ids = _ids(params)
        async with board.pool.acquire() as conn:
            deleted = await discard(conn, ids, schema)
        return f"discarded dead letters {deleted}", {"discarded": deleted}

    def name_of(params: dict[str, Any]) -> str:
        name = str((params.get("name") or [""])[0]).strip()
        if not name:
            raise Refused(400, "give the subscription's name")
        return name

    async def do_seek(params: dict[str, Any]) -> tuple[str, Any]:
        name = name_of(params)
        to = str((params.get("to") or ["latest"])[0]).strip()
        try:
            position = _position(to)
        except click.ClickException as exc:
            raise Refused(400, exc.message) from None
        async with board.pool.acquire() as conn:
            moved = await seek(conn, name, position, schema)
        if not moved:
            raise Refused(404, f"no durable subscription {name!r}")
        return f"moved durable subscription {name!r} to {to}", {"moved": name, "to": to}

    async def do_drop(params: dict[str, Any]) -> tuple[str, Any]:
        name = name_of(params)
        async with board.pool.acquire() as conn:
            dropped = await drop_subscription(conn, name, schema)
        if not dropped:
            raise Refused(404, f"no durable subscription {name!r}")
        return f"dropped durable subscription {name!r}", {"dropped": name}

    actions: dict[str, tuple[Callable[[dict[str, Any]], Awaitable[tuple[str, Any]]], str, bool]]
    actions = {
        # name: (what it does, the page to go back to, whether a form must confirm it)
        "dead-letters/redeliver": (do_redeliver, "/dead-letters", False),
        "dead-letters/discard": (do_discard, "/dead-letters", True),
        "durable/seek": (do_seek, "/durable", True),
        "durable/drop": (do_drop, "/durable", True),
    }

    async def act(request: Request) -> Response:
        name = request.path_params["action"]
        if name not in actions:
            return Response("not found", status_code=404)
        work, back, confirm = actions[name]
        as_json = _wants_json(request)
        params: dict[str, Any]
        try:
            if as_json:
                how = board.guard.check(request)
                params = await _json_params(request)
            else:
                params = await _form(request)
                how = board.guard.check(request, {"csrf": (params.get("csrf") or [""])[0]})
                back = _safe_next((params.get("back") or [back])[0])
                if confirm and (params.get("confirmed") or [""])[0] != "yes":
                    fields = [
                        (key, value)
                        for key, values in params.items()
                        if key not in {"csrf", "confirmed"}
                        for value in values
                    ]
                    return board.render(
                        request,
                        "confirm.html",
                        page="confirm",
                        action=name,
                        fields=fields,
                        cancel=back.partition("?")[0],
                    )
            try:
                text, result = await work(params)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, PgbusError) as exc:
                logger.error(  # noqa: TRY400 - the error is the reason, its trace no news
                    "dashboard %s (from %s) failed: %s", name, _client(request), exc
                )
                raise Refused(503, f"{name} failed: {exc}") from None
        except Refused as exc:
            logger.warning("dashboard %s refused from %s: %s", name, _client(request), exc.reason)
            if as_json:
                return JSONResponse({"error": exc.reason}, status_code=exc.status)
            return board.render(
                request, "refused.html", status=exc.status, page="refused", reason=exc.reason
            )
        logger.info("dashboard %s (%s, from %s): %s", name, how, _client(request), text)
        if as_json:
            return JSONResponse({"ok": True, "message": text, **result})
        return RedirectResponse(_with_query(back, done=board.notice(text)), status_code=303)

    return [
        Route("/", overview_page),
        Route("/fragments/overview", overview_fragment),
        Route("/durable", durable_page),
        Route("/fragments/durable", durable_fragment),
        Route("/dead-letters", dead_letters_page),
        Route("/health", health_page),
        Route("/fragments/health", health_fragment),
        Route("/login", login_page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/actions/{action:path}", act, methods=["POST"]),
        Route("/api/overview", overview_api),
        Route("/api/durable", durable_api),
        Route("/api/dead-letters", dead_letters_api),
        Route("/api/health", health_api),
        Route("/api/{action:path}", act, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("pgbus.dashboard", "static")]), name="static"),
    ]


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _safe_next(target: str) -> str:
    """``target`` if it is a path of this site (never another site), else ``/``."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _next(request: Request) -> str:
    return _safe_next(request.query_params.get("next", "/"))


def _with_query(path: str, **params: str) -> str:
    base, _, query = path.partition("?")
    kept = {k: v[-1] for k, v in parse_qs(query).items() if k not in {"done", "failed"}}
    return f"{base}?{urlencode({**kept, **params})}"


def create_app(
    dsn: str,
    *,
    token: str | None = None,
    read_only: bool = False,
    schema: str = DEFAULT_SCHEMA,
    metrics_channel: str = METRICS_CHANNEL,
    window: float = 300.0,
    refresh: float = 2.0,
    timeout: float = 5.0,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard as an ASGI application (what ``pgbus dashboard`` serves with uvicorn).

    Mount it in an application of your own, or serve it with any ASGI server. Reading
    needs nothing; every change needs ``token`` (see ``docs/dashboard.md``).

    :param dsn: the database (a URL asyncpg takes; see :func:`pgbus.resolve_dsn`).
    :param token: the token that allows changes; ``None``: nothing can be changed.
    :param read_only: refuse every change, whatever the token.
    :param schema: the durable mode's schema.
    :param metrics_channel: where the buses' :class:`pgbus.MetricsPublisher` publish.
    :param window: seconds of history the plots show.
    :param refresh: seconds between the pages' refreshes (and queue usage samples).
    :param timeout: seconds to wait for a connection.
    :param allowed_hosts: answer only requests whose ``Host`` is one of these (``None``:
        any); ``pgbus dashboard`` on loopback allows only loopback names, so that a web
        page elsewhere cannot read it through a DNS name it points at 127.0.0.1.
    :returns: a Starlette application; its lifespan opens and closes the connections.

    .. versionadded:: 0.3.0
    """
    board = Dashboard(
        Settings(
            dsn=dsn,
            token=token,
            read_only=read_only,
            schema=schema,
            metrics_channel=metrics_channel,
            window=window,
            refresh=refresh,
            timeout=timeout,
        )
    )
    app = Starlette(routes=_routes(board), lifespan=board.lifespan)
    app.state.dashboard = board
    app.add_middleware(_SecurityHeaders)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    return app
