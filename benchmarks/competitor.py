"""The competing process of the benchmarks' ``--under-load`` modes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time


@contextlib.contextmanager
def competing_process(core: int = 0):
    """A CPU-bound process pinned to ``core`` for the duration of the block."""
    spin = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    process = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # let it start spinning
        yield process
    finally:
        process.kill()
        process.wait()
