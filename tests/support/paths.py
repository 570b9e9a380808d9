"""Where the tests find the repository and their data files, wherever a test module sits."""

from __future__ import annotations

from pathlib import Path

# tests/support/paths.py -> the repository's root.
ROOT = Path(__file__).resolve().parents[2]
# Example configs (bad_configs/, warning_configs/) and golden files (golden/).
DATA = ROOT / "tests" / "data"
