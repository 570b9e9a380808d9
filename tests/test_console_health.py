"""The admin console shows each route host's health, from the daemon's host health."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.support import configs
from tests.support.console import console_config, login
from tests.support.hosts import closed_port
from tests.support.opsd import send
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink


async def _get(client: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with client.get(url) as response:
        assert response.status == 200
        data: dict[str, object] = await response.json()
        return data


@pytest.mark.asyncio
async def test_a_host_that_refuses_connections_shows_down_on_routes_and_status(tmp_path):
    sink = await Sink().start()
    smtp, admin = free_port(), free_port()
    path = tmp_path / "relay.toml"
    text = console_config(tmp_path, smtp, free_port(), admin, sink.port)
    dead = closed_port()
    path.write_text(text + configs.route("Dead", port=dead) + configs.rule("Dead", "@new.test"))
    proc = RelayProcess(path)
    proc.start(wait_for="event=started")
    base = f"http://127.0.0.1:{admin}"
    client, _ = await login(base)
    try:
        routes = await _get(client, f"{base}/api/routes")
        [fresh] = [r for r in routes["routes"] if r["name"] == "Dead"]  # type: ignore[index, union-attr]
        assert fresh["primary"][0]["health"]["state"] == "up"
        await send(smtp, "s@sender.test", ["x@new.test"])

        for _ in range(200):  # the first attempt fails at once: connection refused
            data = await _get(client, f"{base}/api/routes")
            [route] = [r for r in data["routes"] if r["name"] == "Dead"]  # type: ignore[index, union-attr]
            if route["primary"][0]["health"]["state"] == "down":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the routes API never showed the refusing host down")
        status = await _get(client, f"{base}/api/status")
        [row] = [h for h in status["hosts"] if h["route"] == "Dead"]  # type: ignore[index, union-attr]
        assert row["health"]["state"] == "down"
        assert row["health"]["last_error"]
        async with client.get(f"{base}/routes") as page:
            html = await page.text()
        assert "health: down since" in html
        async with client.get(f"{base}/status") as page:
            assert "down since" in await page.text()
    finally:
        await client.close()
        proc.stop()
        await sink.stop()
