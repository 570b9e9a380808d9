"""deploy/docker/Dockerfile: structure, and its HEALTHCHECK against a real endpoint.

No Docker daemon or Dockerfile linter is assumed; the image build itself is
not exercised here.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from relay import configload
from relay.metrics import Metrics, serve
from tests.support.deploy import DEPLOY, DOCKERFILE, ROOT, dockerfile_instructions


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def test_base_image_and_install() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    assert any("pip install ." in run for run in instructions("RUN"))


def test_copied_sources_exist() -> None:
    missing = [
        source
        for args in instructions("COPY")
        for source in args.split()[:-1]
        if not (ROOT / source).exists()
    ]
    assert missing == []


def test_the_build_copies_what_the_package_links_to() -> None:
    # relay/default.toml is a link to config/relay.toml: `pip install .`
    # in the image needs the file it points to.
    copied = {source for args in instructions("COPY") for source in args.split()[:-1]}
    links = [path for path in (ROOT / "relay").rglob("*") if path.is_symlink()]
    assert links
    for link in links:
        assert str(link.resolve().relative_to(ROOT)) in copied, link


def test_runs_as_a_numeric_non_root_user() -> None:
    (user,) = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_spool_volume_ports_config_and_entrypoint() -> None:
    cfg = configload.load(DEPLOY / "docker" / "relay.toml")
    (volume,) = instructions("VOLUME")
    (volume_path,) = json.loads(volume)
    assert cfg.queue.path.is_relative_to(volume_path)
    assert cfg.audit.path.is_relative_to(volume_path)
    exposed = {int(p) for args in instructions("EXPOSE") for p in args.split()}
    assert exposed == {2525, 9325}
    assert {listen.port for listen in cfg.server.listen} <= exposed
    assert cfg.metrics.listen is not None and cfg.metrics.listen.port in exposed
    assert cfg.metrics.listen.host == "0.0.0.0"
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["relay"]
    assert json.loads(instructions("CMD")[0]) == ["run", "--config", "/etc/relay/relay.toml"]
    assert "COPY deploy/docker/relay.toml /etc/relay/relay.toml" in {
        f"COPY {a}" for a in instructions("COPY")
    }


def healthcheck_code() -> str:
    (check,) = instructions("HEALTHCHECK")
    exec_form = check[check.index("CMD") + 3 :].strip()
    argv = json.loads(exec_form)
    assert argv[:2] == ["python", "-c"]
    code: str = argv[2]
    assert "http://127.0.0.1:9325/healthz" in code
    return code


@pytest.mark.parametrize(("healthy", "exit_code"), [(True, 0), (False, 1)])
async def test_healthcheck_command_against_a_real_endpoint(healthy: bool, exit_code: int) -> None:
    server = await serve(Metrics(), "127.0.0.1", 0, lambda: healthy)
    try:
        port = server.sockets[0].getsockname()[1]
        code = healthcheck_code().replace(":9325/", f":{port}/")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(20):
            assert await proc.wait() == exit_code
    finally:
        server.close()
        await server.wait_closed()


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for args in instructions("COPY"):
        *sources, _ = args.split()
        assert set(sources) <= allowed
