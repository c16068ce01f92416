"""``pgbus run MODULE:ATTR``: serve a Bus as a service (signals, workers, health, reload).

One worker runs in this process (:meth:`pgbus.Bus.run_forever`: SIGTERM or SIGINT drain
and exit 0, a second one exits 130/143). With ``--workers N`` or ``--reload`` this
process supervises worker subprocesses instead: it restarts one that dies (with a
backoff, logged), restarts them all when a source file changes (``--reload``), and
passes a stop signal on to them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pgbus._bus import Bus
from pgbus._health import serve_health
from pgbus._signals import stop_on_signals
from pgbus._util import plural
from pgbus.cli._common import CliError, State, import_target, run

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger("pgbus.run")

#: Seconds a worker must have run for its restart backoff to start over.
HEALTHY_AFTER = 10.0
#: Seconds between two scans of the source files with ``--reload``.
RELOAD_POLL = 0.5
#: Directories ``--reload`` does not look into.
RELOAD_SKIP = frozenset({"__pycache__", "node_modules", "site-packages", "venv"})


def _address(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:8000)")
    return host or "0.0.0.0", int(port)  # noqa: S104 - a probe endpoint listens for the kubelet


async def load_bus(target: str) -> Bus:
    """The Bus that ``module:attr`` names: a Bus, or a callable (sync or async) returning one.

    :raises CliError: when it names nothing, or not a Bus.
    """
    obj = import_target(target)
    if not isinstance(obj, Bus) and callable(obj):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, Bus):
        raise CliError(f"{target} is not a pgbus.Bus nor a callable returning one")
    return obj


async def serve(
    target: str,
    *,
    dsn: str | None,
    stop_timeout: float | None,
    health: tuple[str, int] | None,
) -> None:
    """Load the bus, serve its health endpoints, and run it until a stop signal."""
    bus = await load_bus(target)
    if dsn is not None:
        bus.dsn = dsn
    if stop_timeout is not None:
        bus.stop_timeout = stop_timeout
    server = None
    if health is not None:  # before the bus starts: /readyz says 503 until it is ready
        server = await serve_health(bus, *health)
        host, port = server.sockets[0].getsockname()[:2]
        logger.info("health on http://%s:%d (/livez, /readyz, /metrics)", host, port)
    logger.info(
        "serving %s (pid %d): %s",
        target,
        os.getpid(),
        plural(len(bus.subscriptions), "subscription"),
    )
    try:
        await bus.run_forever()
    finally:
        if server is not None:
            server.close()
    logger.info("stopped")


def _sources(root: Path) -> Iterator[Path]:
    for path in root.iterdir():
        if path.name.startswith(".") or path.name in RELOAD_SKIP:
            continue
        if path.is_dir():
            yield from _sources(path)
        elif path.suffix == ".py":
            yield path


def _mtimes(root: Path) -> dict[Path, float]:
    found = {}
    for path in _sources(root):
        try:
            found[path] = path.stat().st_mtime
        except FileNotFoundError:  # deleted meanwhile: the next scan sees it gone
            continue
    return found


class Supervisor:
    """Keeps ``workers`` worker processes running; restarts them on death or on change."""

    def __init__(
        self,
        argv: list[str],
        workers: int,
        *,
        health: tuple[str, int] | None,
        stop_timeout: float,
        reload: bool,
    ) -> None:
        self.argv = argv
        self.workers = workers
        self.health = health
        self.stop_timeout = stop_timeout
        self.reload = reload
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.restarting = False

    def _argv(self, index: int) -> list[str]:
        if self.health is None:
            return self.argv
        host, port = self.health
        return [*self.argv, "--health", f"{host}:{port + index if port else 0}"]

    async def _keep(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                *self._argv(index),
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it passes it on
                env={**os.environ, "PGBUS_WORKER": str(index)},
            )
            self.procs[index] = proc
            logger.info("worker %d started (pid %d)", index, proc.pid)
            started = loop.time()
            status = await proc.wait()
            if self.stopping.is_set():
                return
            if self.restarting:
                continue
            failures = 0 if loop.time() - started >= HEALTHY_AFTER else failures + 1
            delay = min(30.0, 0.5 * 2 ** (failures - 1)) if failures else 0.0
            logger.warning(
                "worker %d (pid %d) exited with status %d; restarting in %.1f s",
                index,
                proc.pid,
                status,
                delay,
            )
            await asyncio.sleep(delay)  # the backoff; a stop cancels it

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def _stop_all(self, signum: int = signal.SIGTERM) -> None:
        """Signal every worker and wait for it; kill those that outlive the stop timeout."""
        self._signal_all(signum)
        waits = [p.wait() for p in self.procs.values() if p.returncode is None]
        if not waits:
            return
        _, late = await asyncio.wait(
            [asyncio.ensure_future(w) for w in waits], timeout=self.stop_timeout + 5.0
        )
        if late:
            logger.error("%s did not stop in time: killed", plural(len(late), "worker"))
            self._signal_all(signal.SIGKILL)

    async def _watch(self) -> None:
        root = Path.cwd()
        seen = _mtimes(root)
        while True:
            await asyncio.sleep(RELOAD_POLL)
            now = _mtimes(root)
            if now == seen:
                continue
            changed = sorted(str(p.relative_to(root)) for p in now.keys() ^ seen.keys()) or sorted(
                str(p.relative_to(root)) for p in now if now[p] != seen.get(p)
            )
            seen = now
            logger.info("reload: %s changed; restarting the workers", ", ".join(changed))
            self.restarting = True
            await self._stop_all()
            self.restarting = False

    async def run(self) -> int:
        """Supervise until a stop signal; the exit status."""
        with stop_on_signals() as signals:
            keepers = [asyncio.ensure_future(self._keep(i)) for i in range(self.workers)]
            watcher = asyncio.ensure_future(self._watch()) if self.reload else None
            await signals.first.wait()
            self.stopping.set()
            if watcher is not None:
                watcher.cancel()
            logger.warning(
                "%s: stopping %s… (a second signal stops them at once)",
                signals.name,
                plural(self.workers, "worker"),
            )
            stopping = asyncio.ensure_future(self._stop_all())
            second = asyncio.ensure_future(signals.second.wait())
            await asyncio.wait([stopping, second], return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                logger.error("%s again: stopping the workers at once", signals.name)
                self._signal_all(signals.signum or signal.SIGTERM)
                await stopping
                status = signals.exit_status
            else:
                second.cancel()
                status = 0
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        logger.info("stopped")
        return status


def _setup_logging() -> None:
    """Log to stderr at INFO, as a service does (``-v``'s handler stays if it is set)."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", metavar="MODULE:ATTR")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run N worker processes, each its own bus, restarted when one dies.",
)
@click.option(
    "--health",
    metavar="HOST:PORT",
    callback=_address,
    help="Serve /livez, /readyz and /metrics over HTTP (worker i of --workers: PORT+i).",
)
@click.option("--reload", is_flag=True, help="Restart the worker when a .py file here changes.")
@click.option(
    "--dsn",
    metavar="DSN",
    envvar="PGBUS_RUN_DSN",  # how --workers hands it to the workers: never in their argv (ps)
    help="The database (it replaces the bus's own).",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds handlers get to finish after SIGTERM (default: the bus's stop_timeout).",
)
@click.pass_obj
def run_command(
    state: State,
    target: str,
    workers: int,
    health: tuple[str, int] | None,
    reload: bool,
    dsn: str | None,
    stop_timeout: float | None,
) -> None:
    """Serve the Bus that MODULE:ATTR names until SIGTERM or SIGINT.

    ATTR is a pgbus.Bus, or a function (sync or async) that returns one. The first
    SIGTERM or SIGINT stops listening, lets queued and running handlers finish (up to
    the stop timeout), logs what was left and exits 0; a second one stops at once and
    exits 130 (SIGINT) or 143 (SIGTERM).

    \b
      pgbus run app.worker:bus --health 0.0.0.0:8000
      pgbus run app.worker:make_bus --workers 4 --stop-timeout 30
    """
    _setup_logging()
    if dsn is None:
        ctx = click.get_current_context()
        source = ctx.parent.get_parameter_source("dsn") if ctx.parent else None
        if source is click.core.ParameterSource.COMMANDLINE:
            dsn = state.dsn
    if workers == 1 and not reload:
        run(serve(target, dsn=dsn, stop_timeout=stop_timeout, health=health))
        return
    argv = [sys.executable, "-m", "pgbus", "run", target]
    if stop_timeout is not None:
        argv += ["--stop-timeout", str(stop_timeout)]
    if dsn is not None:
        os.environ["PGBUS_RUN_DSN"] = dsn  # the workers' --dsn
    supervisor = Supervisor(
        argv, workers, health=health, stop_timeout=stop_timeout or 10.0, reload=reload
    )
    status = asyncio.run(supervisor.run())
    if status:
        sys.exit(status)
