"""The one adapter between kazoo's threads and trio.

Everything else awaits plain trio objects: the session state is an
``AsyncValue``, calls are coroutines, watches deliver into trio callbacks.
Kazoo invokes our callbacks on its own threads; they only hand the event over
with ``TrioToken.run_sync_soon`` (never blocking, never doing work there).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import ZnodeStat
from trio_util import AsyncValue

__all__ = [
    "NoNodeError",
    "NodeExistsError",
    "SessionState",
    "ZnodeStat",
    "ZooKeeper",
    "ZooKeeperError",
    "ZooKeeperUnavailable",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class ZooKeeperError(Exception):
    """A ZooKeeper operation failed in a way the caller should report."""


class ZooKeeperUnavailable(ZooKeeperError):
    """ZooKeeper could not be reached in time."""


class SessionState(enum.Enum):
    CONNECTING = "connecting"  # before the first session exists
    CONNECTED = "connected"
    SUSPENDED = "suspended"  # connection lost; the session may or may not survive
    LOST = "lost"  # the session expired: every ephemeral node of ours is gone
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionInfo:
    state: SessionState
    session_id: int | None  # None while no session is established
    generation: int  # grows by one for every new session


def _stat_owner(stat: ZnodeStat | None) -> int | None:
    return None if stat is None else stat.ephemeralOwner


class ZooKeeper:
    """A kazoo session bridged into trio.

    ``session`` holds a :class:`SessionInfo` that other tasks wait on
    (``wait_value``/``wait_transition``); every ephemeral node we create lives
    exactly as long as one ``generation``.
    """

    def __init__(self, hosts: str, *, session_timeout_s: float, connect_timeout_s: float) -> None:
        self._hosts = hosts
        self._session_timeout_s = session_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self.session: AsyncValue[SessionInfo] = AsyncValue(
            SessionInfo(SessionState.CONNECTING, None, 0)
        )
        self._client: KazooClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def __repr__(self) -> str:
        info = self.session.value
        return f"<ZooKeeper {self._hosts} {info.state.value} gen={info.generation}>"

    # -- lifecycle ---------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ZooKeeper] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the session, report ready once connected, close it on cancel."""
        self._token = trio.lowlevel.current_trio_token()
        client = KazooClient(
            hosts=self._hosts,
            timeout=self._session_timeout_s,
            # Reconnect forever: giving up is the operator's call (systemd), not ours.
            connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0},
            command_retry={"max_tries": 0},
        )
        self._client = client
        client.add_listener(self._on_kazoo_state)
        try:
            try:
                await trio.to_thread.run_sync(client.start, self._connect_timeout_s)
            except KazooTimeoutError as exc:
                raise ZooKeeperUnavailable(
                    f"could not connect to ZooKeeper at {self._hosts} "
                    f"within {self._connect_timeout_s:g} s"
                ) from exc
            self._publish(client)
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                # A clean close deletes our ephemeral nodes at once, so other
                # instances take over without waiting for the session timeout.
                with trio.move_on_after(5):
                    await trio.to_thread.run_sync(client.stop)
                await trio.to_thread.run_sync(client.close)
            self.session.value = SessionInfo(
                SessionState.CLOSED, None, self.session.value.generation
            )

    def _on_kazoo_state(self, state: str) -> None:
        # Runs on a kazoo thread: hand over, never block here.
        token, client = self._token, self._client
        if token is None or client is None:
            return
        try:
            token.run_sync_soon(self._publish, client)
        except trio.RunFinishedError:
            pass

    def _publish(self, client: KazooClient) -> None:
        current = self.session.value
        kstate = client.state
        if kstate == KazooState.CONNECTED and client.connected:
            session_id = client.client_id[0] if client.client_id else None
            generation = current.generation
            if session_id != current.session_id:
                generation += 1
            new = SessionInfo(SessionState.CONNECTED, session_id, generation)
        elif kstate == KazooState.SUSPENDED:
            new = SessionInfo(SessionState.SUSPENDED, current.session_id, current.generation)
        elif kstate == KazooState.LOST:
            new = SessionInfo(SessionState.LOST, None, current.generation)
        else:
            return
        if new != current:
            log.info(
                "zookeeper_session",
                extra={"state": new.state.value, "generation": new.generation},
            )
            self.session.value = new

    @property
    def connected(self) -> bool:
        return self.session.value.state is SessionState.CONNECTED

    @property
    def session_id(self) -> int | None:
        info = self.session.value
        return info.session_id if info.state is SessionState.CONNECTED else None

    # -- calls -------------------------------------------------------------

    def _require(self) -> tuple[KazooClient, trio.lowlevel.TrioToken]:
        if self._client is None or self._token is None:
            raise ZooKeeperError("ZooKeeper session is not running")
        return self._client, self._token

    async def _call(self, method: str, *args: Any, shield: bool = False, **kwargs: Any) -> Any:
        """Run one of kazoo's ``*_async`` calls and await its result.

        ``shield=True`` for writes that must not be abandoned halfway: the
        caller's cancellation then waits for the server's answer.
        """
        client, token = self._require()
        done = trio.Event()

        def on_done(_result: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        result = getattr(client, method)(*args, **kwargs)
        result.rawlink(on_done)
        with trio.CancelScope(shield=shield):
            await done.wait()
        try:
            return result.get_nowait()
        except KazooException:
            raise
        except Exception as exc:  # kazoo surfaces some failures as plain exceptions
            raise ZooKeeperError(f"{method} failed: {exc}") from exc

    async def create(
        self,
        path: str,
        data: bytes = b"",
        *,
        ephemeral: bool = False,
        makepath: bool = False,
    ) -> ZnodeStat:
        """Create a node and return its stat (``czxid`` is its birth order)."""
        _path, stat = await self._call(
            "create_async",
            path,
            data,
            ephemeral=ephemeral,
            makepath=makepath,
            include_data=True,
            shield=True,
        )
        return stat

    async def ensure_path(self, path: str) -> None:
        client, _ = self._require()
        await trio.to_thread.run_sync(client.ensure_path, path)

    async def get(self, path: str) -> tuple[bytes, ZnodeStat]:
        data, stat = await self._call("get_async", path)
        return data, stat

    async def exists(self, path: str) -> ZnodeStat | None:
        stat: ZnodeStat | None = await self._call("exists_async", path)
        return stat

    async def get_children(self, path: str) -> list[str]:
        children: list[str] = await self._call("get_children_async", path)
        return children

    async def set(self, path: str, data: bytes, *, version: int = -1) -> ZnodeStat:
        stat: ZnodeStat = await self._call("set_async", path, data, version=version, shield=True)
        return stat

    async def delete(self, path: str, *, version: int = -1) -> None:
        await self._call("delete_async", path, version=version, shield=True)

    async def delete_if_mine(self, path: str) -> bool:
        """Delete an ephemeral node only if this session owns it."""
        try:
            stat = await self.exists(path)
            if stat is None or _stat_owner(stat) != self.session_id:
                return False
            await self.delete(path, version=stat.version)
            return True
        except NoNodeError:
            return False

    # -- watches -----------------------------------------------------------

    async def watch_data(
        self, path: str, callback: Callable[[bytes | None, ZnodeStat | None], None]
    ) -> Callable[[], None]:
        """Call ``callback(data, stat)`` in trio now and on every change of ``path``.

        Survives reconnects and session loss (kazoo re-arms the watch).
        Returns a function that stops the watch.
        """
        client, token = self._require()
        stopped = False

        def on_change(data: bytes | None, stat: ZnodeStat | None, _event: object = None) -> bool:
            if stopped:
                return False
            try:
                token.run_sync_soon(callback, data, stat)
            except trio.RunFinishedError:
                return False
            return True

        def stop() -> None:
            nonlocal stopped
            stopped = True

        # DataWatch reads the node once synchronously while it arms the watch.
        await trio.to_thread.run_sync(lambda: client.DataWatch(path, on_change))
        return stop

    async def watch_children(
        self, path: str, callback: Callable[[list[str]], None]
    ) -> Callable[[], None]:
        """Call ``callback(children)`` in trio now and whenever they change."""
        client, token = self._require()
        stopped = False

        def on_change(children: list[str]) -> bool:
            if stopped:
                return False
            try:
                token.run_sync_soon(callback, list(children))
            except trio.RunFinishedError:
                return False
            return True

        def stop() -> None:
            nonlocal stopped
            stopped = True

        await trio.to_thread.run_sync(lambda: client.ChildrenWatch(path, on_change))
        return stop
