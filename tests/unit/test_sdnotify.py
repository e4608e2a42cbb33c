"""The stdlib sd_notify: silent without systemd, abstract and path sockets, watchdog settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from linechatd.sdnotify import Notifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_without_notify_socket_it_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready()  # must not raise
    assert notifier.watchdog_interval_s is None


def test_path_socket_receives_ready_and_status(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        Notifier({"NOTIFY_SOCKET": path}).ready("serving")
        assert sock.recv(1024) == b"READY=1\nSTATUS=serving"


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"linechatd-test-{os.getpid()}-{tmp_path.name}"
    with _receiver("\0" + name) as sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(1024) == b"STOPPING=1"


def test_reloading_carries_monotonic_usec(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        Notifier({"NOTIFY_SOCKET": path}).reloading()
        lines = sock.recv(1024).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and int(value) > 0


def test_watchdog_interval_only_for_this_process() -> None:
    mine = Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s == 2.0
    other = Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).watchdog()


def test_stopping_can_extend_the_stop_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        notifier.stopping(extend_s=45.5)
        assert sock.recv(1024) == b"STOPPING=1\nEXTEND_TIMEOUT_USEC=45500000"
        notifier.stopping()
        assert sock.recv(1024) == b"STOPPING=1"
