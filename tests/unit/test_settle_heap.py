"""The daemon's start-up objects are out of the cyclic collector's walks.

relay.app.settle_heap runs in a child process here: gc.freeze() is
process-wide, and the test process keeps its own collector as it is.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from relay import app
before = gc.get_freeze_count()
app.settle_heap()
print(before, gc.get_freeze_count())
"""


def test_settle_heap_freezes_what_the_process_has_built() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    before, after = (int(n) for n in out.stdout.split())
    assert before == 0
    # Every module, class and function relay imported: thousands of objects.
    assert after > 10_000
