"""Running ``ajs serve`` as a real process, as a user or an operator would."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

AJS = shutil.which("ajs", path=str(Path(sys.executable).parent)) or "ajs"


class Served:
    """A running ``ajs serve`` process and the address it listens on."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, target: str) -> None:
        self.process = process
        self.log = log
        self.target = target


def free_port() -> int:
    """A port nobody listens on now (for a server restarted on the same address)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(cwd: Path, *args: str, address: str = "127.0.0.1:0", log_name: str = "serve.log") -> Served:
    """Starts ``ajs serve`` in ``cwd`` (where its default ./ajs.db lives); waits until it serves.

    ``log_name`` is the file to watch for "serving on" (the server's own log file, if it has one).
    """
    log = cwd / log_name
    already = log.read_text() if log.exists() else ""
    with (cwd / "serve.out").open("ab") if log_name != "serve.log" else log.open("ab") as sink:
        process = subprocess.Popen(
            [AJS, "serve", "--address", address, *args], stdout=sink, stderr=subprocess.STDOUT, cwd=cwd
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", text[len(already) :])
        if found:
            return Served(process, log, found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"ajs serve did not start:\n{log.read_text()}")


class WorkerProcess:
    """A remote worker process (`ajs worker`, or one in another language), once its log says it registered.

    Args:
        command: what to run, in ``cwd``.
        out: the file its stdout goes to, where ``registered`` (a regular expression) is looked for.
        errors: the file its stderr goes to; None sends it to ``out``.
    """

    def __init__(self, command: list[str], cwd: Path, out: Path, registered: str, errors: Path | None = None) -> None:
        self.out = out
        with out.open("wb") as sink, (errors or out).open("ab") as error_sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT if errors is None else error_sink, cwd=cwd
            )
        deadline = time.monotonic() + 30
        while not re.search(registered, out.read_text(), re.MULTILINE):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"{command[0]} did not register:\n{(errors or out).read_text()}")
            time.sleep(0.02)

    def stop(self) -> int:
        """Asks it to drain (SIGTERM) and returns its exit code (killed after 20 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
