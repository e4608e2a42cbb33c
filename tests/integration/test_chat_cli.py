"""The terminal chat (linechatd.chat) against a real cluster, with stdin piped."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio
from support.cluster import ClusterNames, start_cluster

CHAT = [sys.executable, "-m", "linechatd.chat"]


class LineReader:
    """Lines of a child's output stream, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.lines: list[str] = []

    async def wait_for(self, needle: str) -> str:
        """The first line (from now on) containing ``needle``."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode()
                self.lines.append(text)
                if needle in text:
                    return text
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"stream ended before {needle!r}; saw {self.lines}")
            self._buffer += chunk


async def test_two_terminal_chats_talk(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(60):
        async with start_cluster(
            2,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=4,
            sections={"shutdown": {"grace_period_s": 1.0, "drain_stagger_s": 0.0}},
        ) as cluster:
            bob = await trio.lowlevel.open_process(
                [*CHAT, "--uid", "bob", "--to", "alice", "--http", cluster[1].http_url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert bob.stdin is not None and bob.stdout is not None and bob.stderr is not None
            try:
                bob_out, bob_err = LineReader(bob.stdout), LineReader(bob.stderr)
                # Until every partition has an owner, connection-url may answer 503:
                # the chat keeps trying until it is connected.
                await bob_err.wait_for("* connected (")

                alice = await trio.run_process(
                    [*CHAT, "--uid", "alice", "--to", "bob", "--http", cluster[0].http_url],
                    stdin=b"hello bob\n\nsecond line \x1b[31m\n",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                alice_err = alice.stderr.decode()
                assert alice.returncode == 0, alice_err
                assert alice_err.count("* sent (offset ") == 2, alice_err
                assert "Traceback" not in alice_err

                first = await bob_out.wait_for("alice: ")
                second = await bob_out.wait_for("alice: ")
                assert first.startswith("[offset ") and first.endswith("] alice: hello bob")
                # A sender cannot drive the terminal: the escape shows escaped.
                assert second.endswith("] alice: second line \\x1b[31m"), second
                assert int(first.split()[1].rstrip("]")) < int(second.split()[1].rstrip("]"))

                # bob answers, then ends his input: a clean exit.
                await bob.stdin.send_all(b"hi alice\n")
                await bob_err.wait_for("* sent (offset ")
                await bob.stdin.aclose()
                assert await bob.wait() == 0
                await bob_err.wait_for("* bye")
            finally:
                bob.kill()
                await bob.wait()

            # Ctrl-C ends a chat cleanly too.
            carol = await trio.lowlevel.open_process(
                [*CHAT, "--uid", "carol", "--to", "bob", "--http", cluster[0].http_url],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert carol.stderr is not None
            try:
                carol_err = LineReader(carol.stderr)
                await carol_err.wait_for("* connected (")
                carol.send_signal(signal.SIGINT)
                assert await carol.wait() == 0
                await carol_err.wait_for("* bye")
                rest = (carol_err._buffer + await carol.stderr.receive_some(65536)).decode()
                assert "Traceback" not in "\n".join(carol_err.lines) + rest
            finally:
                carol.kill()
                await carol.wait()
                if carol.stdin is not None:
                    await carol.stdin.aclose()


async def test_a_bad_uid_is_refused_before_connecting() -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*CHAT, "--uid", "not a uid", "--to", "bob", "--http", "http://127.0.0.1:9"],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert b"--uid must be" in result.stderr


async def test_chat_with_a_token_file_on_a_jwt_cluster(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    import time

    import jwt

    secret = b"chat-cli-test-secret-0123456789abcdef"
    (tmp_path / "jwt.key").write_bytes(secret)
    claims = {"iss": "https://login.test", "aud": "chat.test"}
    token_file = tmp_path / "alice.jwt"
    token_file.write_text(
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, **claims}, secret, "HS256")
        + "\n"
    )
    with trio.fail_after(60):
        async with start_cluster(
            1,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=2,
            sections={
                "auth": {
                    "mode": "jwt",
                    "jwt_secret_file": str(tmp_path / "jwt.key"),
                    "jwt_issuer": claims["iss"],
                    "jwt_audience": claims["aud"],
                },
                "shutdown": {"grace_period_s": 1.0},
            },
        ) as cluster:
            http = ["--http", cluster[0].http_url]
            alice = await trio.run_process(
                [*CHAT, "--uid", "alice", "--to", "bob", *http, "--token-file", str(token_file)],
                stdin=b"hello with a token\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert alice.returncode == 0, alice.stderr.decode()
            assert b"* sent (offset " in alice.stderr
            # Without the token the gateway refuses for good.
            anonymous = await trio.run_process(
                [*CHAT, "--uid", "alice", "--to", "bob", *http],
                stdin=b"hello\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert anonymous.returncode == 1, anonymous.stderr.decode()
