"""The multiprocess executor's forkserver: started as soon as a run is certain, stopped at once.

Steps fork from a server that has already imported the project (``preload.py``). Its imports
take about a second, so the worker starts it the moment it knows it will run an import, and
that second overlaps the worker's own start (opening the instance, loading the job) instead
of delaying the first step.

At the end, a server left to notice its parent's exit tears down everything it imported
(0.3 s, during which it holds the worker's stdout and stderr open: a caller reading them
waits). It has no state once the run is over, so it is simply killed.

This module imports nothing heavy: the worker calls it before Dagster is imported.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing import forkserver

# Imported once by the forkserver: the project, and the storage layer each step opens.
FORKSERVER_PRELOAD = ["craftflow_migrations.preload"]


def start_forkserver() -> None:
    """Start the server now; the executor, asking for the same preload list, reuses it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    forkserver.ensure_running()


def stop_forkserver() -> None:
    """Kill a server this process started (no teardown); no-op without one.

    SIGKILL, not SIGTERM: the server inherits its parent's ignored signals, and a worker
    started with SIGTERM ignored (some supervisors and test harnesses do) would wait forever.
    """
    server = forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    server._forkserver_pid = None
