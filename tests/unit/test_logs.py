"""Log lines: epoch timestamps, journald priorities under systemd, rate-limited resume lines,
and librdkafka's own lines through the same logger."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path

import pytest

from linechatd.kafka import LIBRDKAFKA_LOG, producer_settings
from linechatd.logs import JsonFormatter, LogfmtFormatter, RateLimitFilter, journald_stream


def _record(level: int, event: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("linechatd.test", level, __file__, 1, event, None, None)
    record.__dict__.update(extra)
    record.created = 1796415357.1239
    return record


def test_timestamps_are_epoch_seconds_in_both_formats() -> None:
    line = LogfmtFormatter("gw-1").format(_record(logging.INFO, "lease_acquired", partition=3))
    assert line.startswith("ts=1796415357.1239 level=info event=lease_acquired ")
    doc = json.loads(JsonFormatter("gw-1").format(_record(logging.INFO, "x")))
    assert doc["ts"] == 1796415357.1239


@pytest.mark.parametrize(
    "level,prefix",
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
    ],
)
def test_journald_lines_carry_their_priority(level: int, prefix: str) -> None:
    line = LogfmtFormatter("gw-1", journald=True).format(_record(level, "e"))
    assert line.startswith(prefix + "ts=")
    assert not LogfmtFormatter("gw-1").format(_record(level, "e")).startswith("<")


def test_every_line_of_a_traceback_gets_the_prefix() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(logging.ERROR, "failed")
        import sys

        record.exc_info = sys.exc_info()
    lines = JsonFormatter("gw-1", journald=True).format(record).split("\n")
    assert all(line.startswith("<3>") for line in lines)


def test_journal_is_detected_by_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        stat = os.fstat(stream.fileno())
        assert journald_stream(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not journald_stream(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not journald_stream(stream, {})


def test_resume_lines_are_rate_limited_and_count_what_they_dropped() -> None:
    now = [0.0]
    limit = RateLimitFilter({"replay_done": (2.0, 3)}, clock=lambda: now[0])
    passed = [limit.filter(_record(logging.INFO, "replay_done")) for _ in range(10)]
    assert passed == [True, True, True] + [False] * 7
    assert limit.filter(_record(logging.INFO, "lease_acquired"))  # others never limited
    now[0] = 1.0  # two more tokens
    record = _record(logging.INFO, "replay_done")
    assert limit.filter(record)
    assert record.suppressed == 7  # type: ignore[attr-defined]
    again = _record(logging.INFO, "replay_done")
    assert limit.filter(again) and not hasattr(again, "suppressed")
    assert not limit.filter(_record(logging.INFO, "replay_done"))


def test_librdkafka_lines_go_through_our_logger(caplog: pytest.LogCaptureFixture) -> None:
    from confluent_kafka import Producer

    # A port nobody listens on: librdkafka logs its failed connection (FAIL).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = producer_settings(f"127.0.0.1:{port}", linger_ms=1, timeout_s=5)
    assert settings["logger"] is LIBRDKAFKA_LOG
    producer = Producer(settings)
    with caplog.at_level(logging.DEBUG, logger="linechatd.librdkafka"):
        for _ in range(100):
            producer.poll(0.1)
            if caplog.records:
                break
    producer.flush(0)
    record = caplog.records[0]
    assert record.name == "linechatd.librdkafka" and record.getMessage() == "librdkafka"
    assert record.levelno >= logging.WARNING
    assert record.facility and record.client.startswith("rdkafka#producer")  # type: ignore[attr-defined]
    line = LogfmtFormatter("gw-1").format(record)
    assert re.search(r"event=librdkafka .*facility=\w+ client=rdkafka#producer-\d+ detail=", line)
