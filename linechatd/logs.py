"""Structured logging: one event per line on stderr, for journald.

Call sites log an event name and put the details in ``extra``::

    log.info("lease_acquired", extra={"partition": 3, "epoch": 4711})

Formats: ``logfmt`` (``ts=1796415357.123456 level=info event=lease_acquired
partition=3 …``) or ``json``. ``ts`` is the time of the event in seconds since
the Unix epoch (UTC), with microseconds: one number that sorts, subtracts and
parses the same in both formats (journald stamps each line with its own
wall-clock time for reading). Every line carries the instance id. Tokens and message bodies are never passed to the
logger, so no formatter has to scrub them.

Under systemd (stderr is the journal: ``JOURNAL_STREAM`` names it) each line
starts with its syslog priority, ``<3>`` for errors and so on, so that
``journalctl -p err`` selects by level.

Events that every resume logs are rate-limited (:data:`RATE_LIMITED_EVENTS`):
past the budget they are dropped and the next one that passes carries
``suppressed=N``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

__all__ = [
    "RATE_LIMITED_EVENTS",
    "JsonFormatter",
    "LogfmtFormatter",
    "RateLimitFilter",
    "configure",
    "journald_stream",
    "set_level",
]

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# syslog priorities (sd-daemon(3)) by logging level, highest level first.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY: Final = 7

# Event -> (lines per second sustained, burst): events logged once per resume,
# which a reconnect storm multiplies by every client.
RATE_LIMITED_EVENTS: Final[Mapping[str, tuple[float, int]]] = {
    "replay_done": (20.0, 100),
    "replay_scan_done": (20.0, 100),
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def _priority(levelno: int) -> int:
    return next((p for level, p in _PRIORITIES if levelno >= level), _DEBUG_PRIORITY)


class _Base(logging.Formatter):
    def __init__(self, instance: str, *, journald: bool = False) -> None:
        super().__init__()
        self.instance = instance
        self.journald = journald

    def event(self, record: logging.LogRecord) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "instance": self.instance,
            "logger": record.name,
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return doc

    def format(self, record: logging.LogRecord) -> str:
        line = self.render(self.event(record))
        if self.journald:
            # One journal entry per line: a traceback's lines each get the prefix.
            prefix = f"<{_priority(record.levelno)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        return line

    def render(self, doc: dict[str, Any]) -> str:
        raise NotImplementedError


class LogfmtFormatter(_Base):
    def render(self, doc: dict[str, Any]) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in doc.items())


class JsonFormatter(_Base):
    def render(self, doc: dict[str, Any]) -> str:
        return json.dumps(doc, default=str, separators=(",", ":"))


class RateLimitFilter(logging.Filter):
    """Drops events of ``limits`` past their budget; the next passing one says how many."""

    def __init__(
        self,
        limits: Mapping[str, tuple[float, int]] = RATE_LIMITED_EVENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._limits = limits
        self._clock = clock
        # event -> (tokens, at, suppressed since the last line that passed)
        self._state: dict[str, tuple[float, float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or record.msg not in self._limits:
            return True
        rate, burst = self._limits[record.msg]
        now = self._clock()
        tokens, at, suppressed = self._state.get(record.msg, (float(burst), now, 0))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._state[record.msg] = (tokens, now, suppressed + 1)
            return False
        self._state[record.msg] = (tokens - 1.0, now, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


def journald_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Is ``stream`` the journal? systemd sets JOURNAL_STREAM to its ``device:inode``."""
    env = os.environ if environ is None else environ
    device, sep, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def configure(*, level: str, fmt: str, instance: str) -> None:
    """Route every logger of the process to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    journald = journald_stream(sys.stderr)
    formatter = JsonFormatter if fmt == "json" else LogfmtFormatter
    handler.setFormatter(formatter(instance, journald=journald))
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # Library chatter at info level is noise for operators.
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
