"""What every command shares: the DSN, model loading, consoles and one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import click
import pydantic
from rich.console import Console

from pgbus._config import resolve_dsn
from pgbus._events import Event
from pgbus.errors import ClusterError, ConfigError, PgbusError, ServerNotFound

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
    from types import ModuleType

T = TypeVar("T")

#: Errors a command turns into one line on stderr and exit status 1, never a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    PgbusError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    pydantic.ValidationError,
    ValueError,  # asyncpg raises it for a malformed DSN (e.g. a port that is not a number)
    ServerNotFound,
    ClusterError,
)


#: What connecting (or talking) to PostgreSQL may raise; ValueError for a malformed DSN.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    ValueError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class CliError(click.ClickException):
    """Bad input: reported in one line on stderr, exit status 1."""


class State:
    """What the ``pgbus`` group passes on to its commands (``ctx.obj``)."""

    def __init__(self, dsn: str | None, timeout: float) -> None:
        self.dsn = dsn
        self.timeout = timeout

    def require_dsn(self) -> str:
        """The DSN (``--dsn``, ``$PGBUS_DSN``, libpq's environment), or a one-line error."""
        try:
            return resolve_dsn(self.dsn, argument="--dsn")
        except ConfigError as exc:
            raise CliError(str(exc)) from exc


def _set_dsn(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        state = ctx.find_object(State)
        if state is not None:
            state.dsn = value


def accept_dsn(command: click.Command) -> None:
    """Let ``command`` (and its subcommands) take ``--dsn`` after its name too."""
    if not any("--dsn" in getattr(p, "opts", ()) for p in command.params):
        command.params.append(
            click.Option(
                ["--dsn"],
                metavar="DSN",
                expose_value=False,
                callback=_set_dsn,
                help="The database (as pgbus --dsn).",
            )
        )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            accept_dsn(sub)


@contextlib.contextmanager
def interrupted() -> Iterator[None]:
    """Turn Ctrl-C into exit status 130 (128 + SIGINT), as a shell reports it, quietly."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def stdout() -> Console:
    """A console on stdout (colour only on a terminal)."""
    return Console(highlight=False, soft_wrap=True)


def stderr() -> Console:
    """A console on stderr for progress and status lines."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def one_line(error: BaseException) -> str:
    """Describe ``error`` in one line, the way the CLI reports it."""
    if isinstance(error, pydantic.ValidationError):
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "input"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        return f"invalid {error.title}: {where}: {first['msg']}{more}"
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError | TimeoutError | asyncpg.InterfaceError):
        return f"cannot reach PostgreSQL: {text}"
    if isinstance(error, asyncpg.PostgresError):
        return f"PostgreSQL: {text}"
    return text


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion; expected errors become a :class:`click.ClickException`."""
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise
    except EXPECTED_ERRORS as exc:
        raise click.ClickException(one_line(exc)) from exc


def with_connection(state: State, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh connection to the command's database, then close it."""

    async def go() -> T:
        conn = await asyncpg.connect(state.require_dsn(), timeout=state.timeout)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return run(go())


def import_module(module_name: str) -> ModuleType:
    """Import ``module_name``, from the current directory too (like ``python -m``).

    :raises CliError: when it cannot be imported.
    """
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {exc!r}") from exc


def import_target(path: str, form: str = "module:attribute") -> Any:
    """The object ``module:attr`` names (``attr`` may be dotted), imported.

    :param form: how the error names the expected shape (``"module:Class"``).
    :raises CliError: when ``path`` has another shape, or names nothing.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"{path!r} is not of the form {form}")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def load_model(path: str) -> type[Event]:
    """Import ``module:Class`` and check that it is a :class:`pgbus.Event` with a channel.

    :raises CliError: when it cannot be imported or is not an event type.
    """
    obj = import_target(path, "module:Class")
    if not (isinstance(obj, type) and issubclass(obj, Event)):
        raise CliError(f"{path} is not a pgbus.Event subclass")
    if obj.pgbus_channel is None:
        raise CliError(f"{path} has no channel (class keyword channel=...)")
    return obj


def load_models(targets: Iterable[str]) -> list[type[Event]]:
    """Event types named by ``module:Class`` targets, or every one defined in a ``module``.

    :raises CliError: when a target names nothing usable.
    """
    found: dict[type[Event], None] = {}
    for target in targets:
        if ":" in target:
            found[load_model(target)] = None
            continue
        module = import_module(target)
        events = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, Event)
            and value is not Event
            and value.pgbus_channel is not None
        ]
        if not events:
            raise CliError(f"module {target!r} defines no pgbus.Event with a channel")
        found.update(dict.fromkeys(events))
    return list(found)


def model_path(model: type[Event]) -> str:
    """``module:QualifiedName`` of an event type."""
    return f"{model.__module__}:{model.__qualname__}"


def dumps(obj: object) -> str:
    """Compact JSON for ``--json`` output (one line)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)
