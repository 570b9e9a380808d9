"""The composition root: builds everything from a Config and runs the daemon.

STUB: implemented under issue #3.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(config_path: Path) -> int:
    print("relay run: not implemented yet", file=sys.stderr)
    return 1
