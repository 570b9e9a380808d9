"""Run every benchmark module in this package: ``python -m tests.bench [NAME ...]``.

``python -m tests.bench compare [--quick] ...`` runs the relay/Postfix
comparison instead (tests/bench/compare.py).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import tests.bench as package


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        # The side-by-side comparison with Postfix: its own options.
        from tests.bench import compare

        return compare.main(argv[1:])
    names = sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("bench_")
    )
    wanted = [n for n in names if not argv or any(a in n for a in argv)]
    for name in wanted:
        module = importlib.import_module(f"tests.bench.{name}")
        print(f"== {name}", flush=True)
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
