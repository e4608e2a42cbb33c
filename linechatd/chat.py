"""``linechatd chat``: a terminal chat on :mod:`linechatd.client`, for trying a cluster by hand.

Each line read from standard input is sent to the peer (as ``{"text": line}``)
and confirmed once the broker has it. Incoming messages, from anyone, go to
standard output as ``[offset N] sender: text``; connection news (connected,
lost, reconnected, resumed) and confirmations go to standard error, prefixed
with ``*``. End of input or Ctrl-C ends the chat.

    linechatd chat --uid alice --to bob --http http://127.0.0.1:7110
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import trio

from .client import ChatClient, ClientError, GroupAck, Message, SendFailed, State
from .protocol import is_valid_uid

# The first instance of `linechatd dev` (its default --base-port).
DEFAULT_HTTP_URL = "http://127.0.0.1:7110"
SEND_TIMEOUT_S = 30.0


def run(http_url: str, uid: str, to: str, *, token: str | None = None) -> int:
    """Chat as ``uid`` with ``to`` through the instance at ``http_url``; the exit code.

    ``token`` is the JWT (``sub`` = uid) when the cluster's auth mode is jwt.

    0 after end of input or Ctrl-C, 1 when the gateway refuses us for good
    (bad uid, bad token, closed for abuse), 2 for an invalid uid argument.
    """
    recipients = [r for r in to.replace(",", " ").split() if r]
    for name, value in (("uid", uid), *(("to", r) for r in recipients or [to])):
        if not is_valid_uid(value):
            print(
                f"linechatd chat: --{name} must be 1-128 characters of [A-Za-z0-9_.:@-], "
                f"got {value!r}",
                file=sys.stderr,
            )
            return 2
    try:
        target: str | list[str] = recipients[0] if len(recipients) == 1 else recipients
        return trio.run(
            functools.partial(
                chat, http_url, uid, target, sys.stdin, sys.stdout, sys.stderr, token=token
            )
        )
    except KeyboardInterrupt:
        print("\n* bye", file=sys.stderr, flush=True)
        return 0


async def chat(
    http_url: str,
    uid: str,
    to: str | list[str],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    *,
    token: str | None = None,
) -> int:
    def status(text: str) -> None:
        print(f"* {text}", file=stderr, flush=True)

    client = ChatClient(http_url, uid, token=token)
    peers = to if isinstance(to, str) else ", ".join(to)
    status(f"{uid} chatting with {peers} via {http_url} (end of input or Ctrl-C to quit)")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quit_on_interrupt, nursery.cancel_scope)
        nursery.start_soon(_show_connection, client, status)
        nursery.start_soon(_show_messages, client, stdout)
        nursery.start_soon(_run_client, client, nursery.cancel_scope)
        await _send_lines(client, to, stdin, status)
        nursery.cancel_scope.cancel()
    if client.fatal is not None:
        status(f"stopped: {client.fatal}")
        return 1
    status("bye")
    return 0


async def _quit_on_interrupt(scope: trio.CancelScope) -> None:
    # Ctrl-C is the ordinary way out of a chat: end it like end of input.
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _run_client(client: ChatClient, scope: trio.CancelScope) -> None:
    try:
        await client.run()
    except ClientError:
        pass  # refused before connecting: client.fatal says why
    finally:
        # A client stopped for good ends the chat.
        scope.cancel()


async def _send_lines(
    client: ChatClient, to: str | list[str], stdin: TextIO, status: Callable[[str], None]
) -> None:
    while True:
        # A thread, because terminal input is not reliably pollable; it is
        # abandoned (blocked in readline) when the chat ends another way.
        line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        text = line.rstrip("\r\n")
        if not text:
            continue
        timeout = SEND_TIMEOUT_S
        try:
            ack = await client.send(to, {"text": text}, timeout_s=timeout)
        except SendFailed as exc:
            status(f"not sent ({exc.code}): {exc.message}")
        except trio.TooSlowError:
            status(f"not confirmed within {timeout:g}s: {text!r}")
        else:
            if isinstance(ack, GroupAck):
                where = ", ".join(f"{a.partition}/{a.offset}" for a in ack.acks)
                status(f"sent to {len(to)} (partition/offset {where})")
            else:
                status(f"sent (offset {ack.offset})")


async def _show_messages(client: ChatClient, stdout: TextIO) -> None:
    async for message in client.messages():
        group = f" (to {', '.join(message.recipients)})" if message.recipients else ""
        print(f"[offset {message.offset}] {message.from_uid}{group}: {_text(message)}", file=stdout)
        stdout.flush()


async def _show_connection(client: ChatClient, status: Callable[[str], None]) -> None:
    async for state, _old in client.state.transitions():
        if state is State.CONNECTED:
            welcome = client.welcome.value
            where = f"{welcome.instance}, partition {welcome.partition}" if welcome else "?"
            if client.connections == 1:
                status(f"connected ({where})")
            else:
                resumed = (
                    ""
                    if welcome is None or welcome.resumed is not False
                    else ("; could not resume, messages may have been missed")
                )
                status(f"reconnected ({where}, connection {client.connections}){resumed}")
        elif state is State.RECONNECTING and client.connections:
            code = client.last_close[0] if client.last_close else None
            status(f"connection lost{f' (close {code})' if code else ''}; reconnecting")
        elif state is State.RECONNECTING:
            status("cannot connect yet; retrying")


def _text(message: Message) -> str:
    body = message.body
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        text = body["text"]
    elif isinstance(body, str):
        text = body
    else:
        text = json.dumps(body, ensure_ascii=False)
    # Never let a sender drive the terminal (escape sequences, carriage returns).
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m linechatd.chat``: the same as ``linechatd chat``."""
    parser = argparse.ArgumentParser(prog="linechatd chat", description=__doc__.splitlines()[0])
    parser.add_argument("--uid", required=True, help="who you are")
    parser.add_argument(
        "--to", required=True, help="who you write to (several: a comma-separated list)"
    )
    parser.add_argument(
        "--http",
        default=DEFAULT_HTTP_URL,
        help=f"any instance's HTTP url (default {DEFAULT_HTTP_URL})",
    )
    add_token_arguments(parser)
    args = parser.parse_args(argv)
    try:
        token = token_from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args.http, args.uid, args.to, token=token)


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--token", metavar="JWT", help="the JWT to connect with (auth mode jwt; visible in ps)"
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding the JWT (surrounding whitespace stripped)",
    )


def token_from_arguments(args: argparse.Namespace) -> str | None:
    """The JWT of --token or --token-file; ValueError naming the flag when unusable."""
    if args.token is not None:
        token = args.token.strip()
    elif args.token_file is None:
        return None
    else:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--token-file: cannot read {args.token_file}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token must be one non-empty line without spaces")
    return token


if __name__ == "__main__":
    sys.exit(main())
