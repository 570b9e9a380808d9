"""Helpers for the ops tests (audit, config diff, metrics endpoint, deploy)."""

from __future__ import annotations

from pathlib import Path

from relay import configload
from relay.config import Config

BASE = """\
[server]
hostname = "relay.example.com"
listen = ["127.0.0.1:2525"]
domains = ["example.com"]
relay_networks = ["127.0.0.0/8"]

[queue]
path = "spool"

[audit]
path = "audit.log"

[[routes]]
name = "On-prem"
host = "mail.corp.example.com"
port = 25

[[routes]]
name = "Split"
[[routes.primary]]
host = "mx1.corp.example.com"
load = 50
[[routes.primary]]
host = "mx2.corp.example.com"
load = 50

[[rules]]
recipients = ["@example.com"]
route = "On-prem"
"""


def load_text(tmp_path: Path, text: str, name: str = "relay.toml") -> Config:
    """Write ``text`` as a config file in ``tmp_path`` and load it."""
    path = tmp_path / name
    path.write_text(text)
    return configload.load(path)
