"""Run a throwaway cluster as a hot standby: ``standby.signal`` and no primary to follow.

Such a server is in recovery for good (until ``pg_promote()``): it accepts connections
and read-only queries, and refuses ``LISTEN`` with "cannot execute LISTEN during
recovery", as a replica does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgbus.server import TempCluster

_STATUS_LINE = 7


def start_standby(cluster: TempCluster, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Stop ``cluster`` and start its data directory again as a hot standby.

    :returns: the postmaster; stop it with :func:`stop_standby` before using ``cluster``.
    """
    cluster.stop("fast")
    base, data = cluster.base_dir, cluster.data_dir
    assert base is not None
    assert data is not None
    run_as = cluster._run_as
    signal_file = data / "standby.signal"
    signal_file.touch()
    if run_as is not None:
        os.chown(signal_file, run_as.uid, run_as.gid)
    command = [str(cluster._exec_bindir / "postgres"), "-D", str(data)]
    command += ["-p", str(cluster.port), "-k", str(base)]
    for name, value in cluster._settings.items():
        command += ["-c", f"{name}={value}"]
    with (base / "standby.log").open("ab") as log:
        if run_as is not None:
            os.chown(base / "standby.log", run_as.uid, run_as.gid)
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=base,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
        )
    deadline = time.monotonic() + timeout
    pidfile = data / "postmaster.pid"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            lines = []
        if (
            len(lines) > _STATUS_LINE
            and lines[0].strip() == str(proc.pid)
            and lines[_STATUS_LINE].strip() in {"standby", "ready"}
        ):
            return proc
        time.sleep(0.005)
    stop_standby(proc)
    raise RuntimeError(f"the standby did not start; see {base / 'standby.log'}")


def stop_standby(proc: subprocess.Popen[bytes]) -> None:
    """Fast-stop the standby's postmaster (promoted or not) and wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
