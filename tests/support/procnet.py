"""Linux's view of TCP sockets (/proc/net/tcp, /proc/<pid>/fd), for tests on loopback.

``tcp_socket(local, remote)`` finds the socket bound to ``local`` and connected
to ``remote``, with its queues: ``tx_queue`` is what the kernel holds that its
peer has not acknowledged (on loopback: what the peer's window does not let
through), ``rx_queue`` what arrived and the owner has not read.
``socket_owner(inode)`` names the process holding a socket. Only processes of
this user can be seen into, which covers a test's own child processes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TcpSocket", "socket_owner", "tcp_socket"]

_PROC = Path("/proc")


@dataclass(frozen=True)
class TcpSocket:
    inode: int
    state: int  # the kernel's TCP state number: 1 is ESTABLISHED
    tx_queue: int
    rx_queue: int


def _proc_net_address(host: str, port: int) -> tuple[str, str] | None:
    """``host:port`` as /proc/net/tcp and tcp6 write it (hex, in the kernel's byte order)."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    (word,) = struct.unpack("=I", packed)
    v4 = f"{word:08X}:{port:04X}"
    # An IPv4 peer on a dual-stack socket: ::ffff:a.b.c.d, four native-order words.
    mapped = struct.unpack("=4I", b"\0" * 10 + b"\xff\xff" + packed)
    v6 = "".join(f"{w:08X}" for w in mapped) + f":{port:04X}"
    return v4, v6


def tcp_socket(local: tuple[str, int], remote: tuple[str, int]) -> TcpSocket | None:
    """The TCP socket bound to ``local`` and connected to ``remote`` (IPv4), if any."""
    local_key = _proc_net_address(*local)
    remote_key = _proc_net_address(*remote)
    if local_key is None or remote_key is None:
        return None
    for table, column in (("tcp", 0), ("tcp6", 1)):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[1] == local_key[column]
                and fields[2] == remote_key[column]
            ):
                tx_queue, _, rx_queue = fields[4].partition(":")
                return TcpSocket(
                    inode=int(fields[9]),
                    state=int(fields[3], 16),
                    tx_queue=int(tx_queue, 16),
                    rx_queue=int(rx_queue, 16),
                )
    return None


def _holds(pid: int, target: str) -> bool:
    fd_dir = _PROC / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:  # gone, or another user's
        return False
    for name in names:
        try:
            if os.readlink(fd_dir / name) == target:
                return True
        except OSError:
            continue
    return False


def socket_owner(inode: int, candidates: Iterable[int] = ()) -> int | None:
    """The pid of a process holding socket ``inode``: ``candidates`` first, then all of /proc."""
    if not inode:  # a socket being torn down has none
        return None
    target = f"socket:[{inode}]"
    tried: set[int] = set()
    for pid in candidates:
        tried.add(pid)
        if _holds(pid, target):
            return pid
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return None
    uid = os.getuid()
    for entry in entries:
        if not entry.isdigit() or int(entry) in tried:
            continue
        try:
            if os.stat(_PROC / entry).st_uid != uid:
                continue
        except OSError:
            continue
        if _holds(int(entry), target):
            return int(entry)
    return None
