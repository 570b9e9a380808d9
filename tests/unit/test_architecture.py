"""docs/architecture.md stays true: every module is on its map, and imports follow its layers.

The page's module map lists every module in relay/ and relay/console/; its
layer table puts each module in one layer, and a module may import only
from its own layer or a lower one (type-only imports included). And the
tests keep their layout (README.md "Development"): pyproject's testpaths
collect only tests/unit, tests/integration and tests/e2e.
"""

from __future__ import annotations

import ast
import re

from tests.support.paths import ROOT

PAGE = ROOT / "docs/architecture.md"
RELAY = ROOT / "relay"

#: The upward imports the page names as exceptions (importer, imported).
EXCEPTIONS = {("console.api", "queuecli")}


def module_name(path_in_relay: str) -> str:
    """``console/api.py`` -> ``console.api``; ``console/__init__.py`` -> ``console``."""
    name = path_in_relay.removesuffix(".py").replace("/", ".")
    return name if name == "__init__" else name.removesuffix(".__init__")


def modules() -> set[str]:
    return {module_name(str(p.relative_to(RELAY))) for p in RELAY.rglob("*.py")}


def mapped() -> set[str]:
    rows = re.findall(r"^\| `relay/([\w/]+\.py)` \|", PAGE.read_text(), re.M)
    return {module_name(row) for row in rows}


def layers() -> dict[str, int]:
    layer_of: dict[str, int] = {}
    for number, cell in re.findall(r"^\| (\d) \w+ \| (.*?) \|", PAGE.read_text(), re.M):
        for name in re.findall(r"`([\w.]+)`", cell):
            assert name not in layer_of, f"{name} is in two layers"
            layer_of[name] = int(number)
    return layer_of


def relay_imports(path_in_relay: str) -> set[str]:
    """The relay modules a module imports, anywhere in it (functions and TYPE_CHECKING too)."""
    tree = ast.parse((RELAY / path_in_relay).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "relay":
            assert node.module is not None
            base = node.module.removeprefix("relay").removeprefix(".")
            if node.module in ("relay", "relay.console"):
                # ``from relay import x``: x is a module, or a name of the package.
                found.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
            else:
                found.add(base)
        elif isinstance(node, ast.Import):
            names = (a.name for a in node.names if a.name.startswith("relay."))
            found.update(name.removeprefix("relay.") for name in names)
    return found


def test_every_module_is_on_the_map_and_in_one_layer() -> None:
    assert mapped() == modules()
    assert set(layers()) == modules()


def test_imports_go_to_the_same_or_a_lower_layer() -> None:
    layer_of = layers()
    upward = set()
    for path in RELAY.rglob("*.py"):
        importer = module_name(str(path.relative_to(RELAY)))
        for imported in relay_imports(str(path.relative_to(RELAY))):
            if imported in layer_of and layer_of[imported] > layer_of[importer]:
                upward.add((importer, imported))
    assert upward == EXCEPTIONS


def test_every_test_module_is_in_a_collected_folder() -> None:
    # A test module left in tests/ itself would never run.
    assert sorted(p.name for p in (ROOT / "tests").glob("test_*.py")) == []
