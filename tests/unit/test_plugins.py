"""Plugin discovery from directories (the seed's plugin folders) and its start-up errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ajs_grpc.engine.handlers.base import RequestHandler
from ajs_grpc.engine.plugins import HandlerSpec, PluginDirs, PluginError, discover


def write(directory: Path, name: str, code: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


JOB_MODULE = """
    from ajs_grpc.jobs import job

    @job("greet")
    async def greet(request, ctx):
        return {"hello": request.data.get("name", "world")}
"""


def test_jobs_come_from_modules_and_packages_in_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "jobs", "greeting.py", JOB_MODULE)
    write(
        tmp_path / "jobs",
        "tools/__init__.py",
        """
        from ajs_grpc.jobs import job

        @job("tool")
        def tool(request, ctx):
            return None
        """,
    )
    write(tmp_path / "jobs", "_private.py", "raise RuntimeError('never imported')")
    plugins = discover(PluginDirs(jobs=(tmp_path / "jobs",)))
    assert {"greet", "tool", "echo"} <= set(plugins.jobs)
    chain = plugins.chain([HandlerSpec("internal", ("greet", "tool"))])
    assert chain.handler_for("greet") is chain.handlers[0]


def test_handlers_and_connectors_come_from_directories(tmp_path: Path) -> None:
    write(
        tmp_path / "handlers",
        "loud.py",
        """
        from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler

        class LoudHandler(InternalAsyncRequestHandler):
            name = "loud"
        """,
    )
    write(
        tmp_path / "connectors",
        "twin.py",
        """
        from ajs_grpc.connectors.memory import MemoryConnector

        class TwinConnector(MemoryConnector):
            name = "twin"
        """,
    )
    plugins = discover(PluginDirs(handlers=(tmp_path / "handlers",), connectors=(tmp_path / "connectors",)))
    assert issubclass(plugins.handlers["loud"], RequestHandler)
    assert plugins.connector("twin").name == "twin"
    assert plugins.connector("postgres").name == "postgres"  # an entry point, imported when asked for
    chain = plugins.chain([HandlerSpec("loud", ("echo",))])
    assert chain.handlers[0].name == "loud"


@pytest.mark.parametrize(
    ("dirs", "files", "kind", "says"),
    [
        ("jobs", {}, "config", "does not exist"),
        ("jobs", {"broken.py": "import no_such_module_anywhere\n"}, "job", "broken.py failed to import"),
        (
            "jobs",
            {"twice.py": JOB_MODULE, "again.py": JOB_MODULE},
            "job",
            "job type 'greet' is provided twice",
        ),
        (
            "jobs",
            {"clash.py": "from ajs_grpc.jobs import job\n\n@job('echo')\nasync def echo(request, ctx):\n    pass\n"},
            "job",
            "job type 'echo' is provided twice",
        ),
        (
            "jobs",
            {"signature.py": "from ajs_grpc.jobs import job\n\n@job('bad')\ndef bad(request):\n    pass\n"},
            "job",
            "must take (request, ctx)",
        ),
        ("handlers", {"oops.py": "raise RuntimeError('boom at import')\n"}, "handler", "boom at import"),
        ("connectors", {"oops.py": "1 / 0\n"}, "connector", "ZeroDivisionError"),
    ],
)
def test_broken_plugins_are_clear_errors_of_their_kind(
    tmp_path: Path, dirs: str, files: dict[str, str], kind: str, says: str
) -> None:
    directory = tmp_path / dirs
    for name, code in files.items():
        write(directory, name, code)
    with pytest.raises(PluginError) as raised:
        discover(PluginDirs(**{dirs: (directory,)}))
    assert raised.value.kind == kind
    assert says in raised.value.message


@pytest.mark.parametrize(
    ("specs", "kind", "says"),
    [
        ([HandlerSpec("nope", ())], "handler", "no handler named 'nope'"),
        ([HandlerSpec("internal", ("missing",))], "job", "job type 'missing'"),
        ([HandlerSpec("process", ("echo",))], "config", "runs plain functions"),
    ],
)
def test_a_configuration_naming_what_is_not_there_is_a_clear_error(
    specs: list[HandlerSpec], kind: str, says: str
) -> None:
    with pytest.raises(PluginError) as raised:
        discover().chain(specs)
    assert raised.value.kind == kind
    assert says in raised.value.message


def test_a_missing_connector_is_a_connector_error() -> None:
    with pytest.raises(PluginError) as raised:
        discover().connector("cassandra")
    assert raised.value.kind == "connector"
    assert "memory" in raised.value.message
