"""Scenario: Postfix → relay → Postfix, with verified TLS on both hops.

Also the template for further scenarios: a downstream Postfix, a relay
config from ``relay_config()``, the relay as a subprocess, an upstream
Postfix (or swaks) in front.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support import configs
from tests.support.pki import Pki
from tests.support.postfix import PostfixFactory
from tests.support.procs import RelayProcess, relay_config, swaks
from tests.support.wait import blocking_until

StartRelay = Callable[[Path], RelayProcess]


def test_postfix_through_relay_with_verified_tls(
    tmp_path: Path, postfix: PostfixFactory, e2e_ca: Pki, relay: StartRelay
) -> None:
    down = postfix.downstream(tls=e2e_ca.issue("127.0.0.1", stem="down"), tls_level="encrypt")
    inbound = e2e_ca.issue("relay.test", stem="relay")
    config = relay_config(
        tmp_path,
        configs.route("Downstream", "127.0.0.1", down.port, **configs.TLS_LEVELS["full"]),
        server={"tls_cert": str(inbound.cert), "tls_key": str(inbound.key)},
        tls={"ca_file": str(e2e_ca.ca_file)},
    )
    proc = relay(config)
    up = postfix.upstream(
        relay_port=proc.port, tls_level="secure", ca_file=e2e_ca.ca_file, tls_match="relay.test"
    )
    up.submit(b"Subject: through\r\n\r\nvia relay\r\n", "alice@up.test", ["bob@example.org"])

    (message,) = down.wait_messages(1, timeout=20)
    assert str(message["Subject"]) == "through"
    assert str(message["Return-Path"]) == "<alice@up.test>"
    up.wait_log(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{proc.port}")
    down.wait_log(r"TLS connection established from localhost\[127\.0\.0\.1\]")


def test_downstream_down_then_up_delivers_queued_mail(
    tmp_path: Path, postfix: PostfixFactory, relay: StartRelay
) -> None:
    down = postfix.downstream()
    proc = relay(relay_config(tmp_path, configs.route("Downstream", "127.0.0.1", down.port)))
    down.stop()
    sent = swaks("--server", f"127.0.0.1:{proc.port}", "--to", "bob@example.org")
    assert sent.returncode == 0, sent.stdout  # accepted into the spool while downstream is down
    blocking_until(
        lambda: any("deferred" in line or "attempt" in line for line in proc.stderr_lines()),
        15,
        what="a failed delivery attempt in the relay log",
    )
    down.start()
    (message,) = down.wait_messages(1, timeout=20)
    assert str(message["Delivered-To"]) == "bob@example.org"
    assert not [line for line in proc.stderr_lines() if "event=bounced" in line]
