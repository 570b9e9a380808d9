"""Fixtures for end-to-end tests: a test CA and private Postfix instances.

Every fixture tears down what it started, even when the test fails; the
Postfix maillogs are copied into the test's ``tmp_path/postfix-logs`` first
so a failure can be investigated. Every test under tests/e2e/ carries the
``e2e`` marker (``pytest -m "not e2e"`` leaves the directory out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.pki import Pki
from tests.support.postfix import PostfixFactory
from tests.support.procs import RelayProcess

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def e2e_ca(tmp_path: Path) -> Pki:
    """A fresh trustme CA whose PEM files live under ``tmp_path/pki``."""
    return Pki(tmp_path / "pki")


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[PostfixFactory]:
    """Factory for private Postfix instances (``.downstream()``, ``.upstream()``).

    Skips the test when Postfix is missing or we are not root.
    """
    factory = PostfixFactory(keep_logs_in=tmp_path / "postfix-logs")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def relay() -> Iterator[Callable[[Path], RelayProcess]]:
    """Start ``python -m relay run --config PATH``: ``proc = relay(path)``.

    Returns once the relay's SMTP port accepts connections; every relay
    started this way is stopped (SIGTERM, then SIGKILL) at teardown.
    """
    started: list[RelayProcess] = []

    def start(config_path: Path) -> RelayProcess:
        proc = RelayProcess(config_path)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
