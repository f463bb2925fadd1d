"""Screenshots of the dashboard for the README: docs/dashboard-{overview,jobs,job}.png.

Starts ``ajs serve --dashboard`` on free ports in a temporary directory, submits a mix of
jobs for a while (so the throughput chart has a history), and photographs the overview
and a running countdown's page in headless Chromium (Debian's chromium and chromium-driver).

    .venv/bin/python scripts/screenshots.py [--out docs] [--seconds 45]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ajs_grpc.client import Client

ROOT = Path(__file__).resolve().parent.parent
AJS = str(Path(sys.executable).parent / "ajs")
TOKEN = "screenshot-admin-token"


def start(folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    tokens = folder / "tokens.toml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    tokens.write_text(f'[[tokens]]\nsha256 = "{digest}"\nprincipal = "ops"\nroles = ["admin"]\n')
    log = folder / "serve.log"
    process = subprocess.Popen(
        [
            *(AJS, "serve", "--address", "127.0.0.1:0", "--dashboard", "127.0.0.1:0"),
            *("--tokens-file", str(tokens), "--shutdown-grace", "1s", "--max-jobs", "16"),
        ],
        cwd=folder,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text()
        grpc_at = re.search(r"serving on (127\.0\.0\.1:\d+)", text)
        web_at = re.search(r"dashboard on (http://127\.0\.0\.1:\d+)/", text)
        if grpc_at and web_at:
            return process, grpc_at.group(1), web_at.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"ajs serve did not start:\n{log.read_text()}")


def load(target: str, seconds: float, stop: threading.Event) -> None:
    """Submits short jobs at a rate that rises and falls, so the throughput chart has a shape."""
    with Client(target, token=TOKEN) as client:
        began = time.monotonic()
        n = 0
        owed = 0.0
        while not stop.is_set() and time.monotonic() - began < seconds:
            elapsed = time.monotonic() - began
            owed += 0.1 * (7 + 5 * math.sin(elapsed / 5))  # jobs per second, in steps of 0.1 s
            while owed >= 1:
                owed -= 1
                n += 1
                if n % 12 == 0:
                    client.submit("fail", {"n": str(n)}, queue="reports")
                elif n % 6 == 0:
                    client.submit("countdown", {"steps": "3", "interval": "0.5"}, queue="batch")
                else:
                    client.submit("echo", {"n": str(n)}, queue="default" if n % 2 else "reports")
            stop.wait(0.1)


def browser() -> webdriver.Chrome:
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960"):
        options.add_argument(argument)
    options.add_argument("--force-device-scale-factor=1")
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long jobs are submitted before the photos")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        process, target, url = start(Path(folder))
        driver = browser()
        stop = threading.Event()
        try:
            with Client(target, token=TOKEN) as client:
                # A few that stay: a long countdown to photograph, a paused-looking backlog, a cancelled one.
                shown = client.submit(
                    "countdown", {"steps": "40", "interval": "1.5", "note": "nightly export"}, id="export-2026-12-01"
                )
                for i in range(3):
                    client.submit("countdown", {"steps": "600", "interval": "1"}, queue="batch", id=f"reindex-{i}")
                for i in range(4):  # queued: they may run in an hour
                    later = datetime.now(UTC) + timedelta(hours=1)
                    client.submit("echo", {"file": f"backup-{i}.tar"}, queue="batch", run_after=later)
                cancelled = client.submit("countdown", {"steps": "600", "interval": "1"}, id="resize-images")
                client.cancel(cancelled.job.request.id)
            driver.get(url + "/signin")
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "signin-button").click()
            WebDriverWait(driver, 10).until(lambda d: d.current_url == url + "/")
            worker = threading.Thread(target=load, args=(target, args.seconds, stop))
            worker.start()
            worker.join()
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#types-table tbody tr"))
            time.sleep(1.5)  # one more sample after the last submit, for the photo only
            driver.save_screenshot(str(args.out / "dashboard-overview.png"))
            driver.get(url + "/jobs?order=desc&page_size=25")
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr"))
            driver.save_screenshot(str(args.out / "dashboard-jobs.png"))
            driver.get(url + "/job?id=" + urllib.parse.quote(shown.job.request.id))
            WebDriverWait(driver, 10).until(
                lambda d: int(d.find_element(By.ID, "job-progress").get_attribute("aria-valuenow") or 0) > 0
            )
            time.sleep(1.0)
            driver.save_screenshot(str(args.out / "dashboard-job.png"))
        finally:
            stop.set()
            driver.quit()
            process.terminate()
            process.wait(timeout=30)
    print(f"wrote dashboard-overview.png, dashboard-jobs.png and dashboard-job.png in {args.out}")


if __name__ == "__main__":
    main()
