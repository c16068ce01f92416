"""``pgbus dashboard``: serve the operator's web page (the ``dashboard`` extra)."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

import click

from pgbus._metrics_publisher import METRICS_CHANNEL
from pgbus.cli._app import _channels
from pgbus.cli._common import CliError, State, stderr
from pgbus.cli._main import CONTEXT_SETTINGS
from pgbus.cli.durable import SCHEMA_OPTION

if TYPE_CHECKING:
    from types import ModuleType

#: The ``Host`` names a dashboard bound to loopback answers to.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

#: What the extra installs: a module missing among these means the extra is missing.
EXTRA_MODULES = ("starlette", "uvicorn", "jinja2")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _extra() -> tuple[ModuleType, ModuleType]:
    """``pgbus.dashboard`` and ``uvicorn``, or a one-line error naming the extra."""
    try:
        import uvicorn  # noqa: PLC0415 - only with the extra

        from pgbus import dashboard  # noqa: PLC0415 - only with the extra
    except ImportError as exc:
        if exc.name is not None and exc.name.partition(".")[0] in EXTRA_MODULES:
            raise CliError(
                f"pgbus dashboard needs the dashboard extra ({exc.name} is missing):"
                " pip install 'pgbus[dashboard]'"
            ) from exc
        raise
    return dashboard, uvicorn


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port", default=8484, show_default=True, type=click.IntRange(0, 65535), help="The port."
)
@click.option(
    "--token",
    envvar="PGBUS_DASHBOARD_TOKEN",
    show_envvar=True,
    help="The token that allows changes (needed to bind another host than loopback).",
)
@click.option("--read-only", is_flag=True, help="Refuse every change, whatever the token.")
@SCHEMA_OPTION
@click.option(
    "--channel",
    default=METRICS_CHANNEL,
    show_default=True,
    help="The channel the buses publish their metrics on.",
)
@click.option(
    "--window",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=10),
    metavar="SECONDS",
    help="How much history the overview's plots show.",
)
@click.pass_obj
def dashboard(
    state: State,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    schema: str,
    channel: str,
    window: float,
) -> None:
    """Serve a web page where operators see the buses of the database and act on them.

    Pages: overview (live buses publishing their metrics, with plots, and the
    notification queue), durable (subscriptions, groups, backlog, leases, scheduled
    events; seek and drop), dead letters (browse, filter, redeliver, discard) and
    health (what `pgbus doctor` checks). Reading needs nothing; every change needs
    the token, given as `Authorization: Bearer TOKEN` or through the login form.
    Without --token, nothing can be changed. Needs `pip install 'pgbus[dashboard]'`.

    \b
      pgbus dashboard                             # http://127.0.0.1:8484, view only
      PGBUS_DASHBOARD_TOKEN=... pgbus dashboard --host 0.0.0.0
    """
    if not is_loopback(host) and not token:
        raise CliError(
            f"refusing to serve the dashboard on {host} without a token: give --token"
            " (or PGBUS_DASHBOARD_TOKEN), or bind to 127.0.0.1"
        )
    (checked,) = _channels([channel])
    dsn = state.require_dsn()
    module, uvicorn = _extra()
    app = module.create_app(
        dsn,
        token=token or None,
        read_only=read_only,
        schema=schema,
        metrics_channel=checked,
        window=window,
        timeout=state.timeout,
        allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None,
    )
    actions = logging.getLogger("pgbus.dashboard")
    if actions.getEffectiveLevel() > logging.INFO:  # what it changed is always reported
        actions.setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # -v set up the root logger; else a plain one
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        actions.addHandler(handler)
    mode = "read-only" if read_only else ("changes need the token" if token else "view only")
    where = f"[{host}]" if ":" in host else host
    stderr().print(f"pgbus dashboard on http://{where}:{port} ({mode}; Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
