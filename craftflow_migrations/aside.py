"""Run one function in a forked child while this process goes on; its result comes back pickled.

The worker lists the NAS this way while it imports Dagster: the listing waits on the NAS (or
walks a folder of 100,000 files) on one core while the imports run on the other, where one
after the other they were the larger part of a run's start. A thread would not do: both
hold the GIL most of the time.

Fork, not spawn: the child inherits the settings and the modules already imported, and
starts in a millisecond. The caller forks before it starts any thread of its own, and
closes its pooled database connections first, so the child never shares a socket with it.
"""

from __future__ import annotations

import os
import pickle
import select
import sys
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ChildFailed(RuntimeError):
    """The child ended without an answer (killed, or its result could not be pickled)."""


class Aside(Generic[T]):
    """``fn()`` running in a child process; :meth:`result` waits for it, or raises what it raised."""

    def __init__(self, fn: Callable[[], T], what: str) -> None:
        self.what = what
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read)
            _die_with(parent)
            _answer(fn, write)
        os.close(write)
        self._pid, self._read = pid, read
        self._outcome: tuple[bool, object] | None = None

    def answered_within(self, seconds: float) -> bool:
        """Whether the child has answered (or ended) within ``seconds``; nothing is read."""
        if self._outcome is not None:
            return True
        ready, _, _ = select.select([self._read], [], [], seconds)
        return bool(ready)

    def result(self) -> T:
        if self._outcome is None:
            with os.fdopen(self._read, "rb") as pipe:
                data = pipe.read()
            _, status = os.waitpid(self._pid, 0)
            if not data:
                code = os.waitstatus_to_exitcode(status)
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                raise ChildFailed(f"{self.what} ended without an answer ({how})")
            self._outcome = pickle.loads(data)
        ok, value = self._outcome
        if ok:
            return value  # type: ignore[return-value]
        raise value  # type: ignore[misc]


def _die_with(parent: int) -> None:
    """Killed with the parent (``PR_SET_PDEATHSIG``): a worker killed -9 leaves no listing running."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the child ends with its listing
    if os.getppid() != parent:  # gone before the signal was asked for
        os._exit(1)


def _answer(fn: Callable[[], object], fd: int) -> None:
    code = 0
    try:
        try:
            outcome: tuple[bool, object] = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in the parent
            # Shown only where the parent prints a traceback: a bug's, not a NAS error's line.
            exc.add_note("in the child process:\n" + "".join(traceback.format_exception(exc)).rstrip())
            outcome = (False, exc)
        try:
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as unpicklable:  # noqa: BLE001 - then its first line, which always pickles
            what = outcome[1] if not outcome[0] else unpicklable
            data = pickle.dumps((False, ChildFailed(f"{type(what).__name__}: {what}".splitlines()[0])))
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BaseException:  # noqa: BLE001 - nothing may escape into the parent's code
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
