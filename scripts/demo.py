#!/usr/bin/env python3
"""Runs the main job once: starts ``ajs serve``, submits ``countdown`` and watches it.

Usage: .venv/bin/python scripts/demo.py [--steps 5]

It is what a new user does in two terminals (``ajs serve``, then
``ajs submit countdown --data steps=5 --watch``), in one command; the server
is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Entry point; returns the exit code of ``ajs submit``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    ajs = shutil.which("ajs", path=str(Path(sys.executable).parent)) or shutil.which("ajs")
    if ajs is None:
        sys.exit("the ajs command is not installed; run the install command of README.md first")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with log.open("wb") as sink:
            # The default embedded SQLite queue, in a throw-away directory.
            server = subprocess.Popen(
                [ajs, "serve", "--address", "127.0.0.1:0"], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp
            )
        try:
            deadline = time.monotonic() + 20
            while not (found := re.search(r"serving on (\S+?) ", log.read_text())):
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"ajs serve did not start:\n{log.read_text()}")
                time.sleep(0.05)
            target = found.group(1)
            print(f"$ ajs serve  # listening on {target}", flush=True)
            print(f"$ ajs submit countdown --data steps={args.steps} --watch", flush=True)
            submit = [ajs, "submit", "countdown", "--data", f"steps={args.steps}", "--watch", "--target", target]
            return subprocess.run(submit, check=False).returncode
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
