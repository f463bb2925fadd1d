"""The ajs command's table: every command parses to the function that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ajs_grpc.edge.auth import Authenticator
from ajs_grpc.faces import cli

COMMANDS = [
    ["token", "new", "alice"],
    ["config", "check", "ajs.toml"],
    ["db", "upgrade"],
    ["serve"],
    ["submit", "echo"],
    ["watch", "r1"],
    ["get", "r1"],
    ["list"],
    ["cancel", "r1"],
    ["queues"],
    ["pause", "images"],
    ["resume", "images"],
    ["health"],
    ["types"],
]


def test_the_table_lists_the_commands_in_help_order() -> None:
    assert [command.name for command in cli._commands()] == [argv[0] for argv in COMMANDS]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_every_command_sets_the_function_that_runs_it(argv: list[str]) -> None:
    args = cli._parser().parse_args(argv)
    assert args.command == argv[0]
    assert callable(args.func)


def test_a_group_without_its_subcommand_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["db"])
    assert exited.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "ajs db: the following arguments are required: DB_COMMAND; see 'ajs db --help'\n"
    )


def test_a_token_for_a_name_the_tokens_file_refuses_is_not_made(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "new", "bad name"]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert "token:" not in captured.out
    assert captured.err.startswith("ajs token new: principal 'bad name' must be 1-64 letters")


def test_a_new_token_entry_reads_back_as_the_tokens_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "new", "alice", "--role", 'ops"x', "--role", "admin"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    entry, token = out.split("# token: ")
    path = tmp_path / "tokens.toml"
    path.write_text(entry)
    principal = Authenticator.from_file(path).authenticate({"authorization": f"Bearer {token.strip()}"}, None)
    assert principal.name == "alice"
    assert principal.roles == frozenset({'ops"x', "admin"})
