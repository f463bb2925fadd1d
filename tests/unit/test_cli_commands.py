"""The ajs command's table: every command parses to the function that runs it."""

from __future__ import annotations

import pytest

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
