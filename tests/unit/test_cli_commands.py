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
    ["retry", "r1"],
    ["delete", "r1"],
    ["schedules"],
    ["queues"],
    ["pause", "images"],
    ["resume", "images"],
    ["health"],
    ["worker", "jobs:resize"],
    ["types"],
]


def test_the_table_lists_the_commands_in_help_order() -> None:
    assert [command.name for command in cli._commands()] == [argv[0] for argv in COMMANDS]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_every_command_sets_the_function_that_runs_it(argv: list[str]) -> None:
    args = cli._parser().parse_args(argv)
    assert args.command == argv[0]
    assert callable(args.func)


SCHEDULE_COMMANDS = [
    (["schedules"], "_schedules"),
    (["schedules", "list"], "_schedules"),
    (["schedules", "create", "s1", "--cron", "* * * * *", "--type", "echo"], "_schedule_create"),
    (["schedules", "get", "s1"], "_schedule_get"),
    (["schedules", "delete", "s1"], "_schedule_delete"),
    (["schedules", "pause", "s1"], "_schedule_pause"),
    (["schedules", "resume", "s1"], "_schedule_resume"),
]


@pytest.mark.parametrize(
    ("argv", "runs"), SCHEDULE_COMMANDS, ids=lambda item: " ".join(item) if isinstance(item, list) else item
)
def test_ajs_schedules_lists_alone_and_runs_each_subcommand(argv: list[str], runs: str) -> None:
    assert cli._parser().parse_args(argv).func.__name__ == runs


def test_a_client_option_given_to_the_schedules_group_reaches_its_subcommand() -> None:
    parser = cli._parser()
    assert parser.parse_args(["schedules", "--target", "h:1", "get", "s1"]).target == "h:1"
    assert parser.parse_args(["schedules", "get", "s1", "--target", "h:2"]).target == "h:2"
    assert parser.parse_args(["schedules", "get", "s1"]).target == cli.DEFAULT_TARGET


def test_submit_takes_dependencies_expiry_attempts_and_an_attempt_timeout() -> None:
    argv = ["submit", "echo", "--depends-on", "a", "--depends-on", "b", "--expire-in", "1h", "--max-attempts", "2"]
    args = cli._parser().parse_args([*argv, "--attempt-timeout", "90s", "--timeout", "5"])
    assert (args.depends_on, args.expire_in, args.max_attempts, args.attempt_timeout) == (["a", "b"], 3600.0, 2, 90.0)
    assert args.timeout == 5.0  # the call's timeout stays what it was


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["schedules", "create", "s1", "--type", "echo"], "the following arguments are required: --cron"),
        (["schedules", "create", "s1", "--cron", "* * * * *", "--type", "echo", "--overlap", "never"], "--overlap"),
        (["submit", "echo", "--expire-in", "soon"], "--expire-in"),
    ],
)
def test_bad_workflow_options_are_one_line_usage_errors(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err
    assert err.count("\n") == 1


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
