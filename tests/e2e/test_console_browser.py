"""The admin console in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Log in, add a multiple-hosts route with 70/30 primaries through the
dialog (a 90 % sum is refused at the field first), run Test TLS against a
sink with a self-signed certificate and see the failed check, save, add
a rule on the Rules page, and then a message sent to the relay arrives
at the new route's hosts. Every page is saved as a PNG in the test's
tmp dir (``screenshots/``).

Selenium blocks, and the sinks live on this test's event loop: the
browser steps run in a thread so the loop keeps serving them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.console import PASSWORD, USER, console_config
from tests.support.opsd import send
from tests.support.peers import require_binary
from tests.support.pki import Pki
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink
from tests.support.wait import until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Seconds any one page element is waited for.
WAIT = 20


def _browser(profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _walk(base: str, shots: Path, profile: Path, ports: dict[str, int], config: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _browser(profile)
    wait = WebDriverWait(driver, WAIT)

    def shot(name: str) -> None:
        driver.save_screenshot(str(shots / f"{name}.png"))

    def field(selector: str, value: str) -> None:
        element = driver.find_element(By.CSS_SELECTOR, selector)
        element.clear()
        element.send_keys(value)

    try:
        driver.get(f"{base}/login")
        shot("login")
        field("#name", USER)
        field("#password", PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.ID, "routes")))
        shot("routes")

        driver.find_element(By.ID, "add-route").click()
        wait.until(ec.presence_of_element_located((By.ID, "route-form")))
        field("#route-name", "Split")
        driver.find_element(By.ID, "kind-multiple").click()
        field("#primary-table .host-row .host", "127.0.0.1")
        field("#primary-table .host-row .port", str(ports["a"]))
        field("#primary-table .host-row .load", "70")
        driver.find_element(By.ID, "add-primary").click()
        second = driver.find_elements(By.CSS_SELECTOR, "#primary-table .host-row")[1]
        second.find_element(By.CSS_SELECTOR, ".host").send_keys("127.0.0.1")
        port2 = second.find_element(By.CSS_SELECTOR, ".port")
        port2.clear()
        port2.send_keys(str(ports["bad"]))
        second.find_element(By.CSS_SELECTOR, ".load").send_keys("20")
        # 70 + 20: refused at the field, before anything is sent.
        error = driver.find_element(By.CSS_SELECTOR, '[data-field="primary"]')
        assert "90 %" in error.text, error.text
        assert driver.find_element(By.ID, "primary-sum").text == "total 90 %"
        before = config.read_bytes()
        driver.find_element(By.ID, "save").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status-message"), "Fix the fields"))
        assert config.read_bytes() == before
        shot("dialog-90-refused")

        load2 = second.find_element(By.CSS_SELECTOR, ".load")
        load2.clear()
        load2.send_keys("30")
        assert error.text == ""
        # The three TLS options are on by default: the self-signed sink fails them.
        driver.find_element(By.ID, "test-tls").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "tls-results"), "TLS test"))
        results = driver.find_element(By.ID, "tls-results").text
        assert "failed check require_ca_signed" in results, results
        assert "failed check require_tls" in results, results  # the plain sink: no STARTTLS
        shot("dialog-test-tls")

        port2.clear()
        port2.send_keys(str(ports["b"]))
        for option in ("validate_hostname", "require_ca_signed", "require_tls"):
            driver.find_element(By.ID, option).click()
        driver.find_element(By.ID, "save").click()
        wait.until(ec.url_to_be(f"{base}/routes"))
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-route="Split"]')
        assert "70 %" in row.text and "30 %" in row.text
        shot("routes-saved")

        driver.get(f"{base}/rules")
        field("#rule-recipients", "@new.test")
        Select(driver.find_element(By.ID, "rule-route")).select_by_visible_text("Split")
        driver.find_element(By.ID, "rule-add-button").click()
        wait.until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, 'tr.rule-row[data-route="Split"]'))
        )
        shot("rules")
        for page in ("queue", "audit", "status"):
            driver.get(f"{base}/{page}")
            wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
            shot(page)
            if page == "audit":
                audit = driver.find_element(By.ID, "audit").text
                assert "console rules_save by ops from 127.0.0.1" in audit, audit
                assert "by console" in audit, audit
    except Exception:
        shot("failure")
        (shots / "failure.html").write_text(f"{driver.current_url}\n{driver.page_source}")
        raise
    finally:
        driver.quit()


@pytest.mark.timeout(180)
async def test_add_a_route_in_the_browser_then_mail_goes_there(tmp_path: Path) -> None:
    require_binary(CHROMIUM, "chromium")
    require_binary(CHROMEDRIVER, "chromium-driver")
    pki = Pki(tmp_path / "pki")
    async with (
        Sink() as sink,
        Sink() as a,
        Sink() as b,
        Sink(tls_context=pki.self_signed_context()) as bad,
    ):
        smtp, admin = free_port(), free_port()
        path = tmp_path / "relay.toml"
        path.write_text(console_config(tmp_path, smtp, free_port(), admin, sink.port))
        shots = tmp_path / "screenshots"
        shots.mkdir()
        proc = RelayProcess(path)
        proc.start(wait_for="event=started")
        try:
            ports = {"a": a.port, "b": b.port, "bad": bad.port}
            base = f"http://127.0.0.1:{admin}"
            await asyncio.to_thread(_walk, base, shots, tmp_path / "profile", ports, path)
            await send(smtp, "s@sender.test", ["x@new.test"])
            await until(lambda: len(a.messages) + len(b.messages) == 1, what="delivery to Split")
        finally:
            proc.stop()
        assert sink.messages == []
        assert sorted(p.name for p in shots.glob("*.png")) == sorted(
            f"{n}.png"
            for n in ("login", "routes", "dialog-90-refused", "dialog-test-tls", "routes-saved",
                      "rules", "queue", "audit", "status")
        )  # fmt: skip
