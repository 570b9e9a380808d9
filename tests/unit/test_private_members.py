"""Every private member of a library that relay reaches into still exists.

Each adapter module that uses a library's internals lists them in
``PRIVATE_MEMBERS`` beside the code that uses them, as ``(module,
dotted attribute path)`` pairs, and pyproject.toml pins the versions they
were verified with. An upgrade that renames or removes one fails here,
naming it, instead of failing mail at run time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.support.paths import ROOT

PYPROJECT = ROOT / "pyproject.toml"

#: The modules that may reach into a library's private members.
ADAPTERS = ("relay.session", "relay.inbound", "relay.commandreader", "relay.certificate")


def _members() -> list[tuple[str, str, str]]:
    found = []
    for adapter in ADAPTERS:
        module = importlib.import_module(adapter)
        for library, path in getattr(module, "PRIVATE_MEMBERS", ()):
            found.append((adapter, library, path))
    return found


@pytest.mark.parametrize(("adapter", "library", "path"), _members())
def test_the_private_member_still_exists(adapter: str, library: str, path: str) -> None:
    owner: object = importlib.import_module(library)
    walked = library
    for name in path.split("."):
        walked = f"{walked}.{name}"
        assert hasattr(owner, name) or _sets_attribute(owner, name), (
            f"{walked} is gone: {adapter} uses it; pin the library to the version "
            "in pyproject.toml or move relay off it"
        )
        owner = getattr(owner, name, None)


def _sets_attribute(owner: object, name: str) -> bool:
    """An instance attribute: the class's own code assigns ``self.<name>``."""
    if not isinstance(owner, type):
        return False
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]")
    return any(
        assigned.search(inspect.getsource(cls))
        for cls in owner.__mro__
        if cls is not object and inspect.getmodule(cls) is not None
    )


@pytest.mark.parametrize("library", sorted({library.split(".")[0] for _, library, _ in _members()}))
def test_the_pinned_version_is_installed(library: str) -> None:
    # The private members were verified with the versions pyproject.toml pins.
    pinned = {
        Requirement(text).name: Requirement(text).specifier
        for text in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    }
    if library not in pinned:
        pytest.skip(f"{library} is not a dependency (the standard library)")
    installed = importlib.metadata.version(library)
    assert pinned[library].contains(installed), (
        f"{library} {installed} is installed; pyproject.toml pins {pinned[library]}"
    )
