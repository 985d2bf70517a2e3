"""Every test runs under pytest-timeout (pyproject.toml): a hang fails that one test with the stack of every thread,
and the run goes on. Checked by running pytest with the project's own settings on a file of hanging tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HANGING = '''
import asyncio, threading

def test_a_deadlock_beside_a_worker_thread():
    stuck = threading.Event()
    threading.Thread(target=stuck.wait, name="the-stuck-worker", daemon=True).start()
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()

async def never_done():
    await asyncio.Event().wait()

async def test_an_event_loop_waiting_forever():
    await asyncio.create_task(never_done(), name="the-hung-task")

def test_the_run_goes_on():
    assert True
'''


def test_a_hang_fails_that_test_with_every_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_hanging.py").write_text(HANGING)
    # -c: the project's pytest settings (timeout, method, asyncio mode); -o timeout: not 180 s here.
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")  # the task dump lives there
    res = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", "-o", "timeout=2", "-q", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    out = res.stdout
    assert res.returncode == 1, out[-3000:]
    assert "2 failed, 1 passed" in out, out[-3000:]
    assert out.count("Timeout (>2.0s) from pytest-timeout") >= 2, out[-3000:]
    assert "Stack of the-stuck-worker" in out and "stuck.wait" in out, out[-3000:]  # the other thread's stack
    assert "lock.acquire()" in out  # and where the test itself hangs
    # an async test: its tasks' stacks (conftest.py adds them), down to the await that never returns
    assert "asyncio task the-hung-task" in out and "in never_done" in out, out[-3000:]
