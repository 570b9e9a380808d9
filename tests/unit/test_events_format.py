"""Log lines: key=value text and JSON, one line per event whatever the values hold."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from relay import events
from relay.events import JsonFormatter, TextFormatter

#: key=value, where value is bare (no space, quote or =) or a JSON string.
_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')


def record(event: str, level: int = logging.INFO, **fields: Any) -> logging.LogRecord:
    rec = logging.getLogger("relay").makeRecord(
        "relay", level, __file__, 1, event, (), None, extra={"fields": fields}
    )
    rec.created = 1_795_861_200.25
    rec.msecs = 250.0
    return rec


def parse_text(line: str) -> dict[str, str]:
    """key=value pairs back from one text line (values quoted as JSON strings)."""
    out = {}
    pos = 0
    while pos < len(line):
        match = _PAIR.match(line, pos)
        assert match, f"not key=value at {line[pos:]!r}"
        key, value = match.group(1), match.group(2)
        assert key not in out, f"duplicate key {key}"
        out[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    return out


NASTY = [
    "plain",
    "",
    "with space",
    'a "quoted" word',
    "key=value",
    "back\\slash",
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\ninjected level=error event=forged",
    "tab\there",
    "nul\x00byte",
    "nel\x85next",
    "ls\u2028ps\u2029",
    "ünïcödé ✓",
]


@pytest.mark.parametrize("value", NASTY)
def test_text_value_survives_quoting_on_one_line(value: str) -> None:
    line = TextFormatter().format(record("accepted", id="Q1", sender=value, size=12))
    assert len(line.splitlines()) == 1, line
    assert "\n" not in line and "\r" not in line
    fields = parse_text(line)
    assert fields["event"] == "accepted"
    assert fields["id"] == "Q1"
    assert fields["sender"] == value
    assert fields["size"] == "12"
    assert fields["level"] == "info"


@pytest.mark.parametrize("value", NASTY)
def test_json_value_round_trips_on_one_line(value: str) -> None:
    line = JsonFormatter().format(record("attempt", logging.WARNING, id="Q1", reply=value))
    assert len(line.splitlines()) == 1, line
    data = json.loads(line)
    assert data == {
        "ts": "2026-11-28T10:20:00.250Z",
        "level": "warning",
        "event": "attempt",
        "id": "Q1",
        "reply": value,
    }


def test_text_line_shape() -> None:
    line = TextFormatter().format(record("reload", result="success", routes=3))
    assert line == "ts=2026-11-28T10:20:00.250Z level=info event=reload result=success routes=3"


def test_text_line_without_fields_has_no_trailing_space() -> None:
    assert TextFormatter().format(record("stopping")).endswith("event=stopping")


def test_non_string_values_are_rendered_with_str() -> None:
    line = JsonFormatter().format(record("attempt", tls=None, verified=True, took=0.5, ip=object))
    data = json.loads(line)
    assert data["tls"] is None and data["verified"] is True and data["took"] == 0.5
    assert data["ip"] == str(object)
    text = parse_text(TextFormatter().format(record("attempt", verified=True, tls=None)))
    assert text["verified"] == "True" and text["tls"] == "None"


def _raise() -> None:
    raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_a_traceback_stays_on_the_event_line(formatter: logging.Formatter) -> None:
    try:
        _raise()
    except RuntimeError:
        rec = record("crash", logging.ERROR, id="Q9")
        rec.exc_info = sys.exc_info()
    line = formatter.format(rec)
    assert len(line.splitlines()) == 1
    if isinstance(formatter, JsonFormatter):
        assert "RuntimeError: boom" in json.loads(line)["traceback"]
    else:
        assert "RuntimeError: boom\nsecond line" in parse_text(line)["traceback"]


@pytest.fixture
def restore_logger() -> Iterator[None]:
    logger = logging.getLogger("relay")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_writes_one_line_per_event_to_stderr(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logger: None
) -> None:
    events.setup(fmt, "info")
    events.log("accepted", id="Q1", sender="a@example.com", rcpts=2)
    events.warning("reload", result="error", problems="x\ny")
    events.log("debug-only", logging.DEBUG, id="Q2")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    if fmt == "json":
        first, second = (json.loads(line) for line in lines)
    else:
        first, second = (parse_text(line) for line in lines)
    assert first["event"] == "accepted" and first["id"] == "Q1"
    assert first["sender"] == "a@example.com"
    assert second["event"] == "reload" and second["level"] == "warning"
    assert second["problems"] == "x\ny"


def test_setup_is_idempotent(restore_logger: None) -> None:
    events.setup("text")
    events.setup("json", "debug")
    logger = logging.getLogger("relay")
    assert len(logger.handlers) == 1
    assert isinstance(logger.handlers[0].formatter, JsonFormatter)
    assert logger.level == logging.DEBUG


async def test_lines_of_one_loop_turn_are_written_together_and_in_order(
    restore_logger: None,
) -> None:
    import io

    stream = io.StringIO()
    events.setup("text")
    handler = logging.getLogger("relay").handlers[0]
    handler.setStream(stream)
    events.log("accepted", id="Q1")
    events.log("delivered", id="Q1")
    assert stream.getvalue() == ""  # not yet: the turn is not over
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    lines = [parse_text(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["accepted", "delivered"]
    events.log("removed", id="Q1")
    events.warning("spool_write_failed", id="Q2")  # a warning: at once, after what waits
    lines = [parse_text(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines][2:] == ["removed", "spool_write_failed"]


def test_lines_outside_a_loop_are_written_at_once(restore_logger: None) -> None:
    import io

    stream = io.StringIO()
    events.setup("json")
    logging.getLogger("relay").handlers[0].setStream(stream)
    events.log("started", listen="127.0.0.1:2525")
    assert json.loads(stream.getvalue())["event"] == "started"
