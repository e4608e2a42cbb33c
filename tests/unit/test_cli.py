"""The command line: every subcommand's help names its exit codes; token flags of chat."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linechatd import chat
from linechatd.cli import build_parser, main

SUBCOMMANDS = ["run", "check-config", "dev", "status", "drain", "publish", "chat"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_documents_its_exit_codes() -> None:
    subparsers = _subparsers(build_parser())
    assert sorted(subparsers) == sorted(SUBCOMMANDS)
    for name, parser in subparsers.items():
        text = parser.format_help()
        assert "exit codes:" in text, name
        assert "  0  " in text or "  0   " in text, name


def test_help_of_status_and_drain_lists_the_same_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for code in ("0", "1", "2", "3"):
        assert f"\n  {code}  " in out


def test_admin_commands_without_a_cluster_are_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status"]) == 2
    assert "give --config PATH or --zookeeper HOSTS" in capsys.readouterr().err


def test_admin_commands_with_an_invalid_config_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[zookeeper]\nhostz = 1\n")
    assert main(["drain", "gw-1", "--config", str(bad)]) == 2
    assert "zookeeper.hostz: unknown key" in capsys.readouterr().err


def _chat_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["chat", "--uid", "alice", "--to", "bob", *argv])


def test_chat_token_from_the_flag_or_a_file(tmp_path: Path) -> None:
    assert chat.token_from_arguments(_chat_args()) is None
    assert chat.token_from_arguments(_chat_args("--token", "a.b.c")) == "a.b.c"
    path = tmp_path / "token"
    path.write_text("\n  x.y.z  \n")
    assert chat.token_from_arguments(_chat_args("--token-file", str(path))) == "x.y.z"
    with pytest.raises(ValueError, match="--token-file: cannot read"):
        chat.token_from_arguments(_chat_args("--token-file", str(tmp_path / "nope")))
    path.write_text("two words\n")
    with pytest.raises(ValueError, match="one non-empty line"):
        chat.token_from_arguments(_chat_args("--token-file", str(path)))


def test_chat_token_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _chat_args("--token", "a", "--token-file", "b")
    assert exited.value.code == 2
