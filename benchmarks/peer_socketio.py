"""The peer: python-socketio's AsyncServer on uvicorn, nodes joined through Redis.

The same message pattern as linechatd: each client joins the room named by its
uid (sent in the namespace CONNECT packet's auth payload); ``send`` emits a
``message`` event to the recipient's room (through AsyncRedisManager, so it
reaches the node the recipient is on) and acknowledges through the callback.
There is no durability: an emit to a room nobody is in is simply dropped.

    python -m benchmarks.peer_socketio --port 9100 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import socketio
import uvicorn


def make_app(redis_url: str) -> Any:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        transports=["websocket"],
        cors_allowed_origins="*",
    )
    uids: dict[str, str] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
        uid = auth.get("uid") if isinstance(auth, dict) else None
        if not isinstance(uid, str) or not uid:
            return False
        uids[sid] = uid
        await sio.enter_room(sid, uid)
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        uids.pop(sid, None)

    @sio.on("send")
    async def send(sid: str, data: Any) -> dict[str, Any]:
        message = {
            "from": uids.get(sid),
            "to": data["to"],
            "id": data["id"],
            "body": data["body"],
            "ts": int(time.time() * 1000),
        }
        await sio.emit("message", message, room=data["to"])
        return {"id": data["id"]}

    return socketio.ASGIApp(sio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    # uvicorn's usual production setup: uvloop, httptools and the websockets library.
    uvicorn.run(
        make_app(args.redis),
        host="127.0.0.1",
        port=args.port,
        loop="auto",
        http="auto",
        ws="websockets",
        ws_ping_interval=None,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
