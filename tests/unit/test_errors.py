"""errors.py: Reply consistency, the failure classes, and the outcome rule."""

from __future__ import annotations

import pytest

from relay import errors
from relay.errors import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    PermanentFailure,
    RelayError,
    Reply,
    TemporaryFailure,
    TlsFailure,
    TlsPolicyFailure,
)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


@pytest.mark.parametrize("cls", _subclasses(TemporaryFailure), ids=lambda c: c.__name__)
def test_every_temporary_failure_has_a_4xx_reply(cls: type[RelayError]) -> None:
    reply = cls().reply
    assert reply.temporary and reply.status[0] == 4


@pytest.mark.parametrize("cls", _subclasses(PermanentFailure), ids=lambda c: c.__name__)
def test_every_permanent_failure_has_a_5xx_reply(cls: type[RelayError]) -> None:
    reply = cls().reply
    assert reply.permanent and reply.status[0] == 5


@pytest.mark.parametrize("reason", list(TlsFailure), ids=lambda r: r.value)
def test_every_tls_failure_is_5_7_with_text_and_option(reason: TlsFailure) -> None:
    failure = TlsPolicyFailure(reason)
    assert failure.reply.code == 550 and failure.reply.status[:2] == (5, 7)
    assert errors.TLS_FAILURE_TEXT[reason] in failure.reply.text
    assert errors.TLS_FAILURE_OPTION[reason] in failure.reply.text
    # RFC 3463: 5.7.4 security features not supported, 5.7.5 cryptographic failure.
    expected = (5, 7, 4) if reason is TlsFailure.NO_STARTTLS else (5, 7, 5)
    assert failure.reply.status == expected


def test_every_canned_reply_is_consistent() -> None:
    canned = [v for v in vars(errors).values() if isinstance(v, Reply)]
    assert len(canned) > 15
    for reply in canned:
        assert reply.code // 100 == reply.status[0]
        assert str(reply).startswith(f"{reply.code} {reply.status_text} ")


@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        (451, (5, 4, 1), "class mismatch"),
        (550, (4, 0, 0), "class mismatch"),
        (250, (2, 0, 0), "two\r\nlines"),
        (250, (2, 0, 0), "bare\nlf"),
    ],
)
def test_inconsistent_replies_are_refused(
    code: int, status: tuple[int, int, int], text: str
) -> None:
    with pytest.raises(ValueError):
        Reply(code, status, text)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as X", Reply(250, (2, 0, 0), "Ok: queued as X")),
        (550, "5.1.1 <a@b>: no such user", Reply(550, (5, 1, 1), "<a@b>: no such user")),
        (451, "try again later", Reply(451, (4, 0, 0), "try again later")),
        # An enhanced code of the wrong class is text, not a status.
        (450, "5.1.1 odd server", Reply(450, (4, 0, 0), "5.1.1 odd server")),
        (554, "multi\nline\r\nreply", Reply(554, (5, 0, 0), "multi line reply")),
        (354, "go ahead", Reply(451, (4, 5, 0), "unexpected reply 354 go ahead")),
    ],
)
def test_parse_remote_replies(code: int, message: str, expected: Reply) -> None:
    assert Reply.parse(code, message) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(451, (4, 4, 1), "unreachable"), Reply(551, (5, 4, 1), "unreachable")),
        (Reply(421, (4, 3, 2), "shutting down"), Reply(521, (5, 3, 2), "shutting down")),
        (Reply(550, (5, 1, 1), "no user"), Reply(550, (5, 1, 1), "no user")),
    ],
)
def test_as_permanent_moves_both_classes(reply: Reply, expected: Reply) -> None:
    assert reply.as_permanent() == expected


OK = Reply(250, (2, 0, 0), "ok")
LATER = Reply(451, (4, 0, 0), "later")
NO = Reply(550, (5, 1, 1), "no")
TLS = TlsPolicyFailure(TlsFailure.UNTRUSTED_CA)


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([], DEFERRED),
        ([OK], DELIVERED),
        ([LATER, OK], DELIVERED),
        ([TLS, OK], DELIVERED),
        ([NO], BOUNCED),
        ([LATER, NO], BOUNCED),
        ([errors.NoSuchDomain()], BOUNCED),
        ([LATER], DEFERRED),
        ([errors.HostUnreachable()], DEFERRED),
        ([errors.RouteMisconfigured()], DEFERRED),
        # Every candidate failed the TLS policy: bounce at once.
        ([TLS], BOUNCED),
        ([TLS, TlsPolicyFailure(TlsFailure.NO_STARTTLS)], BOUNCED),
        # TLS failures mixed with temporary ones: defer.
        ([TLS, errors.HostUnreachable()], DEFERRED),
        ([errors.ConnectionLost(), TLS], DEFERRED),
    ],
)
def test_outcome(results: list[Reply | RelayError], expected: str) -> None:
    assert errors.outcome(results) == expected
