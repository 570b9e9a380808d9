"""One log line per event, on stderr, as key=value text or JSON.

Every line about a message carries its queue id (``id=``) so that
``grep ID`` tells the message's whole story. Addresses are logged,
message bodies never.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import sys
import time
from typing import Any

_logger = logging.getLogger("relay")


#: Characters that some readers take as a line break although JSON leaves
#: them unescaped (NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR).
_UNICODE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _one_line(text: str) -> str:
    """JSON text with the line breaks JSON itself leaves alone escaped too."""
    for char, escape in _UNICODE_BREAKS.items():
        text = text.replace(char, escape)
    return text


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _quote(value: Any) -> str:
    """A value as it appears after ``key=``: bare when safe, else a JSON string.

    Quoting escapes CR, LF and every other control or separator character,
    so a value can never break the line or forge another key (no log
    injection from an address or a remote reply).
    """
    text = value if type(value) is str else str(value)
    if text.isprintable():
        if text and not _NEEDS_QUOTES.search(text):
            return text
        if '"' not in text and "\\" not in text:
            # What json.dumps gives a printable string with nothing to escape
            # (a route name, a reply text), without its cost on every line.
            return f'"{text}"'
    return _one_line(json.dumps(text, ensure_ascii=False))


@functools.lru_cache(maxsize=4)
def _second(epoch: int) -> str:
    """The UTC second as text; cached, as consecutive lines share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


class TextFormatter(logging.Formatter):
    """``ts=... level=info event=accepted id=... from=<a@b> ...``"""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = _second(int(record.created))
        head = f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()}"
        # A trailing underscore lets callers write keywords like from_=.
        body = " ".join(f"{k.rstrip('_')}={_quote(v)}" for k, v in fields.items())
        line = f"{head} event={_quote(record.getMessage())} {body}".rstrip()
        if record.exc_info:
            # Still one line per event: the traceback is a quoted field.
            line += f" traceback={_quote(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": "info", "event": "accepted", "id": ..., ...}``, one per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _second(int(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        data.update((k.rstrip("_"), v) for k, v in getattr(record, "fields", {}).items())
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return _one_line(json.dumps(data, ensure_ascii=False, default=str))


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop turn at once.

    Under load the daemon logs four lines per message; a write() each was
    about 6% of the event loop's time (docs/performance.md). Lines logged while a loop
    runs are joined and written by a callback at the loop's next turn (a
    millisecond or less later, and at most 256 lines apart); warnings and
    errors, and lines logged outside a loop (threads, start-up, shutdown),
    are written at once together with anything pending, so the order of
    lines is kept. A kill -9 can lose the lines of that one turn.
    """

    _BATCH_MAX = 256

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if (
            loop is None
            or record.levelno >= logging.WARNING
            or len(self._pending) >= self._BATCH_MAX
        ):
            self._write_pending()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _write_pending(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        # As StreamHandler: a failing stderr must not take the daemon down.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()


def setup(fmt: str = "text", level: str = "info") -> None:
    """Send relay's events to stderr in the configured format (idempotent)."""
    for old in _logger.handlers:
        old.flush()
    # No formatter here prints a record's thread or process: the logging
    # HOWTO's "Optimization" switches, so that a record does not look them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False


def log(event: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log one event, e.g. ``log("accepted", id=qid, size=1234)``."""
    if not _logger.isEnabledFor(level):
        return
    # makeRecord directly: Logger.log would walk the stack for the caller's
    # file and line (findCaller), which no formatter here prints and which
    # cost several percent of the daemon's CPU per message (docs/performance.md).
    info = sys.exc_info() if exc_info else None
    record = _logger.makeRecord(
        _logger.name, level, "", 0, event, (), info, extra={"fields": fields}
    )
    _logger.handle(record)


def warning(event: str, **fields: Any) -> None:
    log(event, logging.WARNING, **fields)


def error(event: str, exc_info: bool = False, **fields: Any) -> None:
    log(event, logging.ERROR, exc_info=exc_info, **fields)
