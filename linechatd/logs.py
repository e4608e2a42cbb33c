"""Structured logging: one event per line on stderr, for journald.

Call sites log an event name and put the details in ``extra``::

    log.info("lease_acquired", extra={"partition": 3, "epoch": 4711})

Formats: ``logfmt`` (``ts=… level=info event=lease_acquired partition=3 …``)
or ``json``. Every line carries the instance id. Tokens and message bodies are
never passed to the logger, so no formatter has to scrub them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class _Base(logging.Formatter):
    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

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


class LogfmtFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in self.event(record).items())


class JsonFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.event(record), default=str, separators=(",", ":"))


def configure(*, level: str, fmt: str, instance: str) -> None:
    """Route every logger of the process to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(instance) if fmt == "json" else LogfmtFormatter(instance))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # Library chatter at info level is noise for operators.
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
