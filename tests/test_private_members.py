"""Every private member of a library that relay reaches into still exists.

Each adapter module that uses a library's internals lists them in
``PRIVATE_MEMBERS`` beside the code that uses them, as ``(module,
dotted attribute path)`` pairs, and pyproject.toml pins the versions they
were verified with. An upgrade that renames or removes one fails here,
naming it, instead of failing mail at run time.
"""

from __future__ import annotations

import importlib

import pytest

#: The modules that may reach into a library's private members.
ADAPTERS = ("relay.session", "relay.inbound", "relay.certificate")


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
        assert hasattr(owner, name), (
            f"{walked} is gone: {adapter} uses it; pin the library to the version "
            "in pyproject.toml or move relay off it"
        )
        owner = getattr(owner, name)
