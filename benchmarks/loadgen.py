"""The load generator: worker processes driving many WebSocket clients each.

Each worker is a separate process (multiprocessing, spawn) running one uvloop
event loop with picows connections, which cost a few microseconds of CPU per
frame: the servers, not the load generator, must be what saturates. The
harness talks to workers through a pipe, one command and one reply at a time
(``LoadGen.call``), and reads their CPU use from /proc like any other process.

Two client dialects:

* ``contract``: linechatd's frames (CONTRACT.md §5), also spoken by the asyncio
  reference gateway;
* ``socketio``: Engine.IO v4 / Socket.IO v5 text packets over a WebSocket, for
  the python-socketio peer (``40{"uid":...}`` joins the room named by the uid,
  ``42<ack>["send",{...}]`` sends, ``43<ack>[...]`` is the ack).

Latency is measured from each message's *intended* send time (open loop: the
schedule does not wait for the server), carried in the message body, to its
arrival at the recipient, with CLOCK_MONOTONIC (system-wide on Linux), so a
late load generator shows up as latency instead of hiding it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import resource
import socket
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

# IP_BIND_ADDRESS_NO_PORT (Linux): the port is chosen at connect() from the
# whole 4-tuple, so one source address serves far more than 28k connections.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

BODY_BYTES = 100
_BODY_PREFIX = '{"t":'


def make_body(t_ns: int, size: int = BODY_BYTES) -> str:
    """A JSON object of exactly ``size`` bytes carrying the intended send time."""
    stamp = str(t_ns)
    pad = size - len('{"t":,"p":""}') - len(stamp)
    return f'{{"t":{stamp},"p":"{"x" * max(0, pad)}"}}'


def body_time(data: bytes) -> int | None:
    i = data.find(b'"t":')
    if i < 0:
        return None
    j = data.find(b",", i)
    try:
        return int(data[i + 4 : j])
    except ValueError:
        return None


# ---------------------------------------------------------------------------- worker side


class _Conn:
    """Stand-in base until picows is imported in the worker (keeps the harness light)."""


def _listener_class() -> type:
    from picows import WSListener, WSMsgType

    text, close = WSMsgType.TEXT, WSMsgType.CLOSE

    class Conn(WSListener):  # type: ignore[misc]
        __slots__ = ("worker", "uid", "transport", "ready", "close_code", "alive")

        def __init__(self, worker: Worker, uid: str) -> None:
            super().__init__()
            self.worker = worker
            self.uid = uid
            self.transport: Any = None
            self.ready: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
            self.close_code: int | None = None
            self.alive = True

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            if self.worker.dialect == "echo":
                self.worker.on_ready(self)  # an echo server sends no welcome

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            kind = frame.msg_type
            if kind == text:
                self.worker.on_text(self, frame.get_payload_as_bytes())
            elif kind == close:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: Any) -> None:
            self.alive = False
            self.worker.on_disconnected(self)

    return Conn


class Worker:
    def __init__(self, pipe: multiprocessing.connection.Connection, index: int) -> None:
        self.pipe = pipe
        self.index = index
        self.conns: dict[str, Any] = {}
        self.dialect = "contract"
        self._conn_class = _listener_class()
        self._ids = 0
        # Failover probes (op_probe_start / op_probe_result).
        self.probe_waiting: set[str] = set()
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_total = 0
        self._probe_lost: dict[str, int] = {}
        self._probe_back: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.sent = self.acked = self.received = self.errors = self.closed = self.stale = 0
        self.step_t0 = 0
        self.error_codes: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.latencies = array("q")
        self.ack_latencies = array("q")
        self.pacer_lags = array("q")
        self.pending: dict[bytes, int] = {}
        self.last_receive_ns = 0
        self.probe_hits: dict[str, int] = {}

    # -- frames --------------------------------------------------------------------

    def on_text(self, conn: Any, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.dialect != "socketio":  # "contract", and "echo" (our own frames back)
            kind = data[9:12]
            if kind == b"mes":
                t = body_time(data)
                self._on_message(conn, now, t)
            elif kind == b"ack":
                end = data.index(b'"', 20)
                self._on_ack(now, data[20:end])
            elif kind == b"wel":
                self.on_ready(conn)
            elif kind == b"err":
                self.errors += 1
                start = data.find(b'"code":"')
                code = data[start + 8 : data.find(b'"', start + 8)] if start >= 0 else b"?"
                self.error_codes[code.decode()] += 1
        else:
            head = data[:2]
            if head == b"42":
                if data.startswith(b'42["message"'):
                    self._on_message(conn, now, body_time(data))
            elif head == b"43":
                end = data.index(b"[", 2)
                self._on_ack(now, data[2:end])
            elif head == b"2":
                conn.transport.send(_TEXT, b"3")
            elif data[:1] == b"0":
                conn.transport.send(_TEXT, b'40{"uid":"' + conn.uid.encode() + b'"}')
            elif head == b"40":
                self.on_ready(conn)
            elif head == b"44" or head == b"41":
                self.errors += 1
                self.error_codes[data[:40].decode(errors="replace")] += 1

    def on_ready(self, conn: Any) -> None:
        if conn.ready is not None and not conn.ready.done():
            conn.ready.set_result(None)

    def _on_message(self, conn: Any, now: int, t: int | None) -> None:
        if t is not None and t < self.step_t0:
            # Sent in an earlier step and delivered only now: not this step's.
            self.stale += 1
            return
        self.received += 1
        self.last_receive_ns = now
        if t is not None:
            self.latencies.append((now - t) // 1000)
            if conn.uid in self.probe_waiting:
                self.probe_hits.setdefault(conn.uid, now)

    def _on_ack(self, now: int, msg_id: bytes) -> None:
        self.acked += 1
        sent_at = self.pending.pop(msg_id, None)
        if sent_at is not None:
            self.ack_latencies.append((now - sent_at) // 1000)

    def on_disconnected(self, conn: Any) -> None:
        self.closed += 1
        self.close_codes[str(conn.close_code)] += 1
        if conn.ready is not None and not conn.ready.done():
            conn.ready.set_exception(ConnectionError(f"closed with {conn.close_code}"))
        uid = conn.uid
        if self.conns.get(uid) is conn:
            del self.conns[uid]

    # -- commands ----------------------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A thread waits on the pipe: an event-loop reader would make the pipe
            # non-blocking, and large replies would then fail half-written.
            command = await loop.run_in_executor(None, self.pipe.recv)
            op = command.pop("op")
            if op == "exit":
                await self.op_close(None)
                self.pipe.send({"ok": True})
                return
            try:
                reply = await getattr(self, f"op_{op}")(**command)
            except Exception as exc:  # reported to the harness, which decides
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.pipe.send(reply)

    async def _connect(self, uid: str, url: str, source: str | None, read_buffer: int) -> Any:
        from picows import ws_connect

        def socket_factory(_parsed: Any) -> socket.socket | None:
            if source is None:
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return sock

        conn_class = self._conn_class
        _transport, conn = await ws_connect(  # picows is untyped: conn is a Conn
            lambda: conn_class(self, uid),
            url,
            socket_factory=socket_factory,
            read_buffer_init_size=read_buffer,
            enable_auto_ping=False,
            websocket_handshake_timeout=None,
            max_frame_size=1 << 22,
        )
        return conn

    async def op_open(
        self,
        dialect: str,
        items: Sequence[tuple[str, str, str | None]],
        concurrency: int = 64,
        connect_timeout_s: float = 30.0,
        read_buffer: int = 16 * 1024,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Open (uid, url, source address) connections; ready = welcome / namespace joined."""
        self.dialect = dialect
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        opened = 0
        started = time.monotonic()
        stop_at = started + deadline_s if deadline_s is not None else None
        latencies = array("q")

        async def one(uid: str, url: str, source: str | None) -> None:
            nonlocal opened
            async with gate:
                if stop_at is not None and time.monotonic() >= stop_at:
                    failures["deadline"] += 1
                    return
                t = time.monotonic_ns()
                for attempt in range(OPEN_ATTEMPTS):
                    try:
                        async with asyncio.timeout(connect_timeout_s):
                            conn = await self._connect(uid, url, source, read_buffer)
                            assert conn.ready is not None
                            await conn.ready
                        break
                    except Exception as exc:
                        why = _describe(exc)
                        # A partition between owners (a subtree restarting on a
                        # fresh broker): try again, as a client would.
                        if why in _RETRIED and attempt + 1 < OPEN_ATTEMPTS:
                            await asyncio.sleep(OPEN_RETRY_S)
                            continue
                        failures[why] += 1
                        return
                conn.ready = None
                latencies.append((time.monotonic_ns() - t) // 1000)
                self.conns[uid] = conn
                opened += 1

        await asyncio.gather(*(one(*item) for item in items))
        return {
            "opened": opened,
            "failed": sum(failures.values()),
            "failures": dict(failures.most_common(5)),
            "elapsed_s": time.monotonic() - started,
            "connect_us": latencies.tobytes(),
            "open_now": len(self.conns),
        }

    async def op_load(
        self,
        pairs: Sequence[tuple[str, str]],
        rate: float,
        duration_s: float,
        start_at: float,
        drain_s: float,
    ) -> dict[str, Any]:
        """Send ``rate`` msg/s for ``duration_s`` over (sender, recipient) pairs, open loop."""
        self._reset()
        loop_send = [(self.conns.get(s), r) for s, r in pairs]
        missing = sum(1 for c, _ in loop_send if c is None)
        live = [(c, r) for c, r in loop_send if c is not None]
        total = int(rate * duration_s)
        if not live or total == 0:
            return self._load_reply(total=0, missing=missing, lag_ms=0.0, at_end=0)
        interval_ns = 1e9 / rate
        t0 = int(start_at * 1e9)
        self.step_t0 = t0
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        contract = self.dialect != "socketio"
        echo = self.dialect == "echo"
        pending = self.pending
        n_live = len(live)
        i = 0
        worst_lag = 0
        lags = self.pacer_lags
        while i < total:
            now = time.monotonic_ns()
            due = min(total, int((now - t0) / interval_ns) + 1)
            if due > i:
                lag = now - int(t0 + i * interval_ns)
                lags.append(lag // 1000)
                worst_lag = max(worst_lag, lag)
            while i < due:
                intended = int(t0 + i * interval_ns)
                conn, to = live[i % n_live]
                self._ids += 1
                msg_id = str(self._ids)
                body = make_body(intended)
                if echo:
                    frame = f'{{"type":"message","id":"{msg_id}","to":"{to}","body":{body}}}'
                elif contract:
                    frame = f'{{"type":"send","id":"{msg_id}","to":"{to}","body":{body}}}'
                else:
                    frame = f'42{msg_id}["send",{{"id":"{msg_id}","to":"{to}","body":{body}}}]'
                if conn.alive:
                    pending[msg_id.encode()] = intended
                    conn.transport.send(_TEXT, frame.encode())
                i += 1
                self.sent += 1
            # uvloop's timers have millisecond resolution: shorter sleeps would spin.
            next_due = t0 + i * interval_ns - time.monotonic_ns()
            await asyncio.sleep(max(0.001, next_due / 1e9))
        at_end = self.received
        drain_until = time.monotonic() + drain_s
        # Polled: the frame callbacks stay plain counters, with no event per message.
        while time.monotonic() < drain_until and (  # noqa: ASYNC110
            self.received < self.sent or (self.acked < self.sent and not echo)
        ):
            await asyncio.sleep(0.01)
        if echo:
            self.acked = self.received  # an echo is its own acknowledgement
        return self._load_reply(
            total=total, missing=missing, lag_ms=worst_lag / 1e6, at_end=at_end, t0_ns=t0
        )

    def _load_reply(
        self, *, total: int, missing: int, lag_ms: float, at_end: int, t0_ns: int = 0
    ) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "scheduled": total,
            "acked": self.acked,
            "received": self.received,
            "received_when_sending_ended": at_end,
            "stale_from_earlier_steps": self.stale,
            "errors": self.errors,
            "error_codes": dict(self.error_codes),
            "closed": self.closed,
            "close_codes": dict(self.close_codes),
            "missing_senders": missing,
            "pacer_worst_lag_ms": lag_ms,
            "first_send_ns": t0_ns,
            "last_receive_ns": self.last_receive_ns,
            "latency_us": self.latencies.tobytes(),
            "ack_latency_us": self.ack_latencies.tobytes(),
            "pacer_lag_us": self.pacer_lags.tobytes(),
        }

    async def op_close(
        self, uids: Sequence[str] | None, per_second: float | None = None
    ) -> dict[str, Any]:
        """Close connections (all when ``uids`` is None) with 1000 and wait briefly.

        ``per_second`` spreads the closes out (a whole phase's worth of clients
        leaving in the same instant is a test of its own, not a way to end one).
        """
        targets = (
            list(self.conns.values())
            if uids is None
            else [self.conns[u] for u in uids if u in self.conns]
        )
        batch = max(1, int(per_second / 20)) if per_second else len(targets) or 1
        for i, conn in enumerate(targets):
            try:
                conn.transport.send_close(_NORMAL)
                conn.transport.disconnect()
            except Exception:  # already gone
                pass
            if per_second and (i + 1) % batch == 0:
                await asyncio.sleep(0.05)
        with_deadline = time.monotonic() + 10
        while any(c.alive for c in targets) and time.monotonic() < with_deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for conn in targets:
            self.conns.pop(conn.uid, None)
        return {"closed": len(targets), "open_now": len(self.conns)}

    async def op_count(self) -> dict[str, Any]:
        return {"open_now": len(self.conns), "closed": self.closed}

    async def op_probe_start(
        self,
        senders: Sequence[tuple[str, str]],
        probes: Sequence[tuple[str, str]],
        interval_s: float,
    ) -> dict[str, Any]:
        """Failover probes: one recipient per partition of the instance about to stop.

        Senders on the surviving instance write to every probe every
        ``interval_s`` (the probes are spread over the senders, so that no
        sender's acks outrun its connection); ``probe_result`` later tells when
        each probe, after losing its connection, received a message again over
        a new one.
        """
        self.dialect = "contract"
        self._reset()
        self.probe_waiting = set()
        sender_conns = []
        for sender_uid, sender_url in senders:
            conn = await self._connect(sender_uid, sender_url, None, 16 * 1024)
            await asyncio.wait_for(conn.ready, 10)
            self.conns[sender_uid] = conn
            sender_conns.append(conn)
        probe_conns = {}
        for uid, url in probes:
            probe = await self._connect(uid, url, None, 16 * 1024)
            await asyncio.wait_for(probe.ready, 10)
            probe_conns[uid] = probe
            self.conns[uid] = probe
        self._probe_total = len(probe_conns)
        self._probe_lost = {}
        self._probe_back = {}
        self._probe_task = asyncio.create_task(
            self._probe_run(sender_conns, probe_conns, senders[0][1], interval_s)
        )
        return {"probes": len(probe_conns)}

    async def _probe_run(
        self, senders: list[Any], probes: dict[str, Any], survivor_url: str, interval_s: float
    ) -> None:
        from picows import WSError

        async def reconnect(uid: str, old: Any) -> None:
            while old.alive:  # noqa: ASYNC110 - set from a picows callback
                await asyncio.sleep(0.005)
            self._probe_lost[uid] = time.monotonic_ns()
            base = survivor_url.split("?", 1)[0]
            while True:
                try:
                    async with asyncio.timeout(5):
                        conn = await self._connect(uid, f"{base}?uid={uid}", None, 16 * 1024)
                        await conn.ready
                except (WSError, OSError, TimeoutError, ConnectionError):
                    await asyncio.sleep(0.02)  # 421 until the survivor owns the partition
                    continue
                self.conns[uid] = conn
                self.probe_waiting.add(uid)
                self.probe_hits.pop(uid, None)
                while uid not in self.probe_hits:  # noqa: ASYNC110 - as above
                    await asyncio.sleep(0.002)
                self._probe_back[uid] = self.probe_hits[uid]
                return

        tasks = [asyncio.create_task(reconnect(uid, conn)) for uid, conn in probes.items()]
        try:
            while True:
                now = time.monotonic_ns()
                for i, uid in enumerate(probes):
                    self._ids += 1
                    body = make_body(now)
                    frame = f'{{"type":"send","id":"p{self._ids}","to":"{uid}","body":{body}}}'
                    sender = senders[i % len(senders)]
                    if sender.alive:
                        sender.transport.send(_TEXT, frame.encode())
                await asyncio.sleep(interval_s)
        finally:
            for task in tasks:
                task.cancel()

    async def op_probe_result(self, t0: float, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        total = self._probe_total
        while len(self._probe_back) < total and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if self._probe_task is not None:
            self._probe_task.cancel()
        t0_ns = int(t0 * 1e9)
        lost = dict(self._probe_lost)
        back = dict(self._probe_back)
        self.probe_waiting = set()
        await self.op_close(None)
        return {
            "probes": total,
            "recovered": len(back),
            "lost_after_s": {u: (v - t0_ns) / 1e9 for u, v in lost.items()},
            "back_after_s": {u: (v - t0_ns) / 1e9 for u, v in back.items()},
            "outage_s": {u: (back[u] - lost[u]) / 1e9 for u in back if u in lost},
        }


# Handshake answers that mean "not now" (421 wrong instance, 503 unavailable).
_RETRIED = frozenset({"http_421", "http_503"})
OPEN_ATTEMPTS = 10
OPEN_RETRY_S = 0.5


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status", None)
    if status is not None:
        return f"http_{int(status)}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}({os.strerror(exc.errno)})"
    return type(exc).__name__


def _init_constants() -> None:
    global _TEXT, _NORMAL
    from picows import WSCloseCode, WSMsgType

    _TEXT = WSMsgType.TEXT
    _NORMAL = WSCloseCode.OK


_TEXT: Any = None
_NORMAL: Any = None


def worker_main(pipe: multiprocessing.connection.Connection, index: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _init_constants()
    import uvloop

    uvloop.run(Worker(pipe, index).serve())


# ---------------------------------------------------------------------------- harness side


class LoadGen:
    """A pool of worker processes; ``call`` sends one command to each and gathers replies."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, args=(theirs, index), name=f"loadgen-{index}", daemon=True
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def __len__(self) -> int:
        return len(self.pipes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def call(self, commands: Sequence[dict[str, Any] | None], timeout: float) -> list[Any]:
        """Send commands[i] to worker i (None: skip it); wait for every reply."""
        waiting: list[multiprocessing.connection.Connection] = []
        for pipe, command in zip(self.pipes, commands, strict=True):
            if command is not None:
                pipe.send(command)
                waiting.append(pipe)
        deadline = time.monotonic() + timeout
        replies: dict[Any, Any] = {}
        while len(replies) < len(waiting):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load generator did not answer within {timeout:g}s")
            for ready in multiprocessing.connection.wait(
                [p for p in waiting if p not in replies], left
            ):
                assert isinstance(ready, multiprocessing.connection.Connection)
                replies[ready] = ready.recv()
        results = [replies.get(pipe) for pipe in self.pipes]
        for reply in results:
            if isinstance(reply, dict) and "error" in reply:
                raise RuntimeError(f"load generator failed: {reply['error']}")
        return results

    def broadcast(self, command: dict[str, Any], timeout: float) -> list[Any]:
        return self.call([dict(command) for _ in self.pipes], timeout)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send({"op": "exit"})
            except OSError:
                pass
        for process in self.processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join(5)
