"""A function run in a forked child: its result, its exception, its death, and its parent's."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from craftflow_migrations.aside import Aside, ChildFailed
from craftflow_migrations.nas.clients.base import NasError


def test_the_result_comes_back_from_another_process():
    aside = Aside(lambda: {"pid": os.getpid(), "files": list(range(100_000))}, "a child")
    result = aside.result()
    assert result["pid"] != os.getpid() and result["files"][-1] == 99_999
    assert aside.result() is result  # asked twice, answered once


def _fails():
    raise NasError("NAS_BASE_PATH '/share' does not exist on 127.0.0.1: check NAS_BASE_PATH")


def test_an_exception_is_raised_again_here_with_its_message_and_the_childs_traceback_as_a_note():
    with pytest.raises(NasError) as raised:
        Aside(_fails, "a child").result()
    assert str(raised.value) == "NAS_BASE_PATH '/share' does not exist on 127.0.0.1: check NAS_BASE_PATH"
    assert "in the child process:" in raised.value.__notes__[0] and "_fails" in raised.value.__notes__[0]


def test_what_cannot_be_pickled_and_a_killed_child_fail_with_one_line():
    import threading

    with pytest.raises(ChildFailed, match=r"^TypeError: cannot pickle '_thread.lock' object$"):
        Aside(threading.Lock, "a child").result()
    with pytest.raises(ChildFailed, match=r"^the NAS listing process ended without an answer \(killed by signal 9\)$"):
        Aside(lambda: os.kill(os.getpid(), signal.SIGKILL), "the NAS listing process").result()


def test_answered_within_waits_no_longer_than_asked():
    slow = Aside(lambda: time.sleep(1.5) or "done", "a child")
    started = time.monotonic()
    assert not slow.answered_within(0.2)
    assert time.monotonic() - started < 1.0
    assert slow.answered_within(5) and slow.result() == "done"


def test_the_child_dies_with_its_parent_killed_minus_9():
    # A worker killed between listing and import leaves no listing running on the NAS.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, time
        from craftflow_migrations.aside import Aside
        aside = Aside(lambda: time.sleep(600), "a child")
        print(aside._pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{child}/stat") as stat:
                    if stat.read().split(") ")[1].startswith("Z"):
                        break  # dead, waiting for init to reap it
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its parent")
    finally:
        parent.kill()
