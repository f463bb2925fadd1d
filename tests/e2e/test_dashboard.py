"""The web dashboard of ``ajs serve --dashboard``, end to end: a real server process and headless Chromium.

Chromium and chromedriver are Debian's (``apt-get install chromium chromium-driver``);
Selenium is told where they are, so Selenium Manager never downloads a browser.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ajs_grpc.client import Client
from tests.helpers import eventually_sync
from tests.serve_process import AJS

CHROMIUM = os.environ.get("AJS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AJS_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token", "root": "root-secret-token"}


def tokens_file(folder: Path) -> Path:
    entries = []
    for principal, token in TOKENS.items():
        roles = 'roles = ["admin"]\n' if principal == "root" else ""
        entries.append(
            f'[[tokens]]\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\nprincipal = "{principal}"\n{roles}'
        )
    path = folder / "tokens.toml"
    path.write_text("\n".join(entries))
    return path


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    target: str  # gRPC
    url: str  # the dashboard, http://127.0.0.1:PORT

    def client(self, principal: str) -> Client:
        return Client(self.target, token=TOKENS[principal])


def start_dashboard(folder: Path, *, tokens: bool = True) -> Served:
    """``ajs serve --dashboard 127.0.0.1:0`` (with a tokens file); waits for both addresses in its log."""
    log = folder / "serve.log"
    auth = ["--tokens-file", str(tokens_file(folder))] if tokens else []
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                AJS,
                "serve",
                "--address",
                "127.0.0.1:0",
                "--dashboard",
                "127.0.0.1:0",
                *auth,
                "--database",
                str(folder / "ajs.db"),
                "--shutdown-grace",
                "1s",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    found: dict[str, str] = {}

    def started() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"ajs serve exited:\n{log.read_text()}")
        text = log.read_text()
        grpc_at = re.search(r"serving on (127\.0\.0\.1:\d+)", text)
        web_at = re.search(r"dashboard on (http://127\.0\.0\.1:\d+)/", text)
        if grpc_at and web_at:
            found.update(target=grpc_at.group(1), url=web_at.group(1))
        return bool(found)

    try:
        eventually_sync(started, within=30)
    except BaseException:
        process.kill()
        raise
    return Served(process, found["target"], found["url"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = start_dashboard(tmp_path_factory.mktemp("dashboard"))
    yield running
    running.process.terminate()
    running.process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


# -- plain HTTP -------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Http:
    """A cookie-keeping HTTP client that reports redirects instead of following them."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPCookieProcessor(self.cookies))

    def call(
        self, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with self.opener.open(request, timeout=10) as reply:
                # An event stream never ends: its first bytes are enough.
                body = reply.read(1) if reply.headers.get_content_type() == "text/event-stream" else reply.read()
                return reply.status, dict(reply.headers), body
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def sign_in(self, principal: str) -> None:
        form = urllib.parse.urlencode({"token": TOKENS[principal], "next": "/"}).encode()
        status, headers, _ = self.call("/signin", data=form, headers={"Origin": self.base})
        assert status == 303, status
        assert headers["Location"] == "/"

    def json(self, path: str, *, method: str | None = None) -> tuple[int, Any]:
        headers = {}
        if method == "POST":
            headers["X-CSRF-Token"] = self.json("/api/session")[1]["csrf"]
            headers["Origin"] = self.base
        status, _, body = self.call(path, headers=headers, method=method, data=b"" if method == "POST" else None)
        return status, json.loads(body)

    def events(self, path: str) -> Iterator[tuple[str, Any]]:
        """The (event, data) pairs of a server-sent event stream, as they come."""
        with self.opener.open(urllib.request.Request(self.base + path), timeout=15) as reply:
            assert reply.headers.get_content_type() == "text/event-stream"
            event, data = "", ""
            for raw in reply:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    data = line[len("data: ") :]
                elif not line and event:
                    yield event, json.loads(data)
                    event, data = "", ""


PROTECTED_PAGES = ["/", "/jobs", "/job?id=x", "/static/common.js", "/static/job.js", "/static/vendor/uPlot.iife.min.js"]
PROTECTED_API = [
    "/api/session",
    "/api/types",
    "/api/jobs",
    "/api/job?id=x",
    "/api/events/overview",
    "/api/events/job?id=x",
]


def test_nothing_is_served_without_signing_in(served: Served) -> None:
    anonymous = Http(served.url)
    for path in PROTECTED_PAGES:
        status, headers, _ = anonymous.call(path)
        assert status == 303, path
        location = urllib.parse.urlsplit(headers["Location"])
        assert location.path == "/signin", path
        assert urllib.parse.parse_qs(location.query)["next"] == [path]
    for path in PROTECTED_API:
        status, _, body = anonymous.call(path)
        assert status == 401, path
        assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
    for action in ("cancel", "retry"):
        status, _, _ = anonymous.call(f"/api/job/{action}?id=x", data=b"", headers={"Origin": served.url})
        assert status == 401
    # The sign-in page and its stylesheet are public.
    assert anonymous.call("/signin")[0] == 200
    assert anonymous.call("/static/dashboard.css")[0] == 200
    # A made-up session cookie is no session.
    forged = Http(served.url)
    forged.opener.addheaders = [("Cookie", "ajs_session=made-up")]
    assert forged.call("/api/session")[0] == 401


def test_a_wrong_token_does_not_sign_in(served: Served) -> None:
    visitor = Http(served.url)
    form = urllib.parse.urlencode({"token": "not-a-token", "next": "/"}).encode()
    status, headers, body = visitor.call("/signin", data=form, headers={"Origin": served.url})
    assert status == 401
    assert "Set-Cookie" not in headers
    assert b"refused this token" in body
    assert visitor.call("/api/session")[0] == 401


def test_signing_in_sets_a_strict_http_only_cookie_and_signing_out_ends_the_session(served: Served) -> None:
    user = Http(served.url)
    form = urllib.parse.urlencode({"token": TOKENS["alice"], "next": "https://evil.example/"}).encode()
    status, headers, _ = user.call("/signin", data=form, headers={"Origin": served.url})
    assert status == 303
    assert headers["Location"] == "/"  # never a redirect off the site
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    status, session = user.json("/api/session")
    assert status == 200
    assert session["principal"] == "alice"
    assert session["admin"] is False
    status, headers, _ = user.call("/signout", data=b"", headers={"Origin": served.url})
    assert status == 303
    assert user.call("/api/session")[0] == 401


def test_writes_need_the_csrf_token_and_the_same_origin(served: Served) -> None:
    user = Http(served.url)
    user.sign_in("alice")
    with served.client("alice") as client:
        job = client.submit("countdown", {"steps": "1000", "interval": "1"}).job
    path = f"/api/job/cancel?id={urllib.parse.quote(job.request.id)}"
    csrf = user.json("/api/session")[1]["csrf"]
    assert user.call(path, data=b"", headers={"Origin": served.url})[0] == 403  # no token
    assert user.call(path, data=b"", headers={"Origin": served.url, "X-CSRF-Token": "wrong"})[0] == 403
    assert user.call(path, data=b"", headers={"Origin": "http://evil.example", "X-CSRF-Token": csrf})[0] == 403
    status, cancelled = user.json(path, method="POST")
    assert status == 200
    assert cancelled["cancel_requested"] or cancelled["state"] == "CANCELLED"


def test_a_user_cannot_see_another_principals_job_but_an_admin_can(served: Served) -> None:
    with served.client("bob") as bob:
        job = bob.submit("countdown", {"steps": "1000", "interval": "1"}, id="bobs-job").job
    assert job.request.id == "bobs-job"
    alice = Http(served.url)
    alice.sign_in("alice")
    status, page = alice.json("/api/jobs?page_size=100")
    assert status == 200
    assert all(listed["creator"] == "alice" for listed in page["jobs"])
    for seen_as in ("bobs-job", "~bob/bobs-job"):
        quoted = urllib.parse.quote(seen_as, safe="")
        status, body = alice.json(f"/api/job?id={quoted}")
        assert status in (403, 404), body
        assert alice.call(f"/api/events/job?id={quoted}")[0] in (403, 404)
        status, body = alice.json(f"/api/job/cancel?id={quoted}", method="POST")
        assert status in (403, 404), body
    root = Http(served.url)
    root.sign_in("root")
    assert root.json("/api/session")[1]["admin"] is True
    status, page = root.json("/api/jobs?page_size=1000&state=PENDING&state=CREATED")
    assert "~bob/bobs-job" in {listed["id"] for listed in page["jobs"]}
    status, seen = root.json("/api/job?id=" + urllib.parse.quote("~bob/bobs-job", safe=""))
    assert status == 200
    assert seen["creator"] == "bob"
    status, cancelled = root.json("/api/job/cancel?id=" + urllib.parse.quote("~bob/bobs-job", safe=""), method="POST")
    assert status == 200
    assert cancelled["id"] == "~bob/bobs-job"


def test_the_overview_counts_only_the_viewers_jobs_and_those_that_ended(served: Served) -> None:
    alice = Http(served.url)
    alice.sign_in("alice")
    stream = alice.events("/api/events/overview")
    # The first events may come before the WatchJobs stream is open (ended is null until it is).
    for event, data in stream:
        if event == "overview" and data["ended"] is not None:
            break
    with served.client("bob") as bob:
        for submitted in [bob.submit("echo", {"n": str(n)}) for n in range(5)]:
            assert list(bob.watch(submitted.job.request.id))[-1].state.name == "FINISHED"
    with served.client("alice") as client:
        mine = [client.submit("echo", {"n": str(n)}).job.request.id for n in range(2)]
        for request_id in mine:
            assert list(client.watch(request_id))[-1].state.name == "FINISHED"
    ended = 0
    for event, data in stream:
        assert event == "overview", data
        ended += sum(count for _, count in data["ended"])
        if ended >= 2:
            break
    assert ended == 2  # bob's five are not alice's to see
    assert "echo" in {row["name"] for row in data["types"]}
    stream.close()


def test_a_typed_input_and_output_are_shown_as_json(served: Served) -> None:
    from ajs_examples.proto.ajs.examples.v1.hash_pb2 import Algorithm, HashRequest

    with served.client("alice") as client:
        task = HashRequest(data=b"abc", algorithm=Algorithm.ALGORITHM_SHA256, rounds=1)
        request_id = client.submit("hash", input=task).job.request.id
        assert list(client.watch(request_id))[-1].state.name == "FINISHED"
    alice = Http(served.url)
    alice.sign_in("alice")
    status, job = alice.json("/api/job?id=" + urllib.parse.quote(request_id, safe=""))
    assert status == 200
    assert job["input_type"] == "ajs.examples.v1.HashRequest"
    assert job["input"] == {"data": "YWJj", "algorithm": "ALGORITHM_SHA256", "rounds": 1}
    assert job["last"]["output_type"] == "ajs.examples.v1.HashResponse"
    assert job["last"]["output"] == {"hex_digest": hashlib.sha256(b"abc").hexdigest()}


def test_an_admin_sees_paused_queues_on_the_overview(served: Served) -> None:
    with served.client("root") as root_client:
        root_client.pause_queue("maintenance")
        try:
            root = Http(served.url)
            root.sign_in("root")
            stream = root.events("/api/events/overview")
            for event, data in stream:
                assert event == "overview", data
                if data["queues"]:
                    break
            assert {"name": "maintenance", "queued": 0, "running": 0, "failed": 0, "paused": True} in data["queues"]
            stream.close()
        finally:
            root_client.resume_queue("maintenance")


def test_without_a_tokens_file_the_dashboard_is_as_open_as_the_api_but_writes_still_need_csrf(
    tmp_path: Path,
) -> None:
    running = start_dashboard(tmp_path, tokens=False)
    try:
        visitor = Http(running.url)
        assert visitor.call("/")[0] == 200
        # A page of another site whose name now points here (DNS rebinding) gets nothing.
        port = urllib.parse.urlsplit(running.url).port
        assert visitor.call("/api/session", headers={"Host": f"evil.example:{port}"})[0] == 421
        assert visitor.call("/", headers={"Host": f"localhost:{port}"})[0] == 200
        status, headers, _ = visitor.call("/signin")
        assert status == 303
        assert headers["Location"] == "/"
        status, session = visitor.json("/api/session")
        assert session == {"authenticated": False, "principal": "", "admin": True, "csrf": session["csrf"]}
        with Client(running.target) as client:
            job = client.submit("countdown", {"steps": "1000", "interval": "1"}).job
        path = "/api/job/cancel?id=" + urllib.parse.quote(job.request.id)
        assert visitor.call(path, data=b"", headers={"Origin": running.url})[0] == 403
        status, cancelled = visitor.json(path, method="POST")
        assert status == 200
        assert cancelled["id"] == job.request.id
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)


# -- in the browser ---------------------------------------------------------------------------


def _wait(driver: Any, condition: Any, timeout: float = 30) -> Any:
    """Waits until ``condition(driver)`` is truthy; elements replaced by a live update meanwhile are looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(condition)


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, element_id).text
    return text


def _sign_in_in_browser(driver: Any, served: Served, principal: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(served.url + "/")
    _wait(driver, lambda d: "/signin" in d.current_url and d.find_elements(By.ID, "token"))
    driver.find_element(By.ID, "token").send_keys(TOKENS[principal])
    driver.find_element(By.ID, "signin-button").click()
    _wait(driver, lambda d: d.current_url == served.url + "/")
    _wait(driver, lambda d: d.find_elements(By.ID, "principal") and principal in _text(d, "principal"))


@pytest.mark.timeout(180)
def test_in_the_browser_sign_in_follow_a_countdown_to_finished_and_cancel_another(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    _sign_in_in_browser(driver, served, "alice")

    # The overview lists the types with their counts and draws the chart.
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#types-table tr[data-name='countdown']"))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))

    with served.client("alice") as client:
        slow = client.submit("countdown", {"steps": "8", "interval": "0.4"}).job.request.id
        endless = client.submit("countdown", {"steps": "1000", "interval": "0.5"}).job.request.id

    # The countdown's page: its bar moves (two different values), then it ends FINISHED.
    driver.get(served.url + "/job?id=" + urllib.parse.quote(slow, safe=""))
    _wait(driver, lambda d: _text(d, "job-id") == slow)

    def bar_value(d: Any) -> int:
        return int(d.find_element(By.ID, "job-progress").get_attribute("aria-valuenow"))

    first = _wait(driver, lambda d: (v := bar_value(d)) > 0 and v < 100 and v)
    _wait(driver, lambda d: bar_value(d) > first)
    _wait(driver, lambda d: _text(d, "job-state") == "FINISHED")
    assert bar_value(driver) == 100
    rows = driver.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")
    states = [row.find_element(By.CSS_SELECTOR, ".badge").text for row in rows]
    assert states[0] == "CREATED"
    assert states[-1] == "FINISHED"
    sequences = [int(row.get_attribute("data-sequence")) for row in rows]
    assert sequences == list(range(1, len(sequences) + 1))  # every Response once, in order
    assert driver.find_element(By.ID, "cancel-button").get_attribute("disabled") is not None

    # Another one: cancelled with the button while it runs.
    driver.get(served.url + "/job?id=" + urllib.parse.quote(endless, safe=""))
    _wait(driver, lambda d: _text(d, "job-state") == "PENDING" and bar_value(d) > 0)
    _wait(driver, lambda d: d.find_element(By.ID, "cancel-button").is_enabled())
    driver.find_element(By.ID, "cancel-button").click()
    _wait(driver, lambda d: _text(d, "job-state") == "CANCELLED")
    _wait(driver, lambda d: d.find_element(By.ID, "retry-button").is_enabled())

    # The job list: filtered to CANCELLED, newest first, it shows that job.
    driver.get(served.url + "/jobs?state=CANCELLED&type=countdown&order=desc")

    def listed(d: Any) -> dict[str, str]:
        rows = d.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr")
        return {row.get_attribute("data-id"): row.get_attribute("data-state") for row in rows}

    shown = _wait(driver, lambda d: (found := listed(d)) and endless in found and found)
    assert set(shown.values()) == {"CANCELLED"}

    # Retry from the job page: it runs again.
    driver.get(served.url + "/job?id=" + urllib.parse.quote(endless, safe=""))
    _wait(driver, lambda d: d.find_element(By.ID, "retry-button").is_enabled())
    driver.find_element(By.ID, "retry-button").click()
    _wait(driver, lambda d: _text(d, "job-state") in ("CREATED", "PENDING"))
    driver.find_element(By.ID, "cancel-button").click()
    _wait(driver, lambda d: _text(d, "job-state") == "CANCELLED")

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


def test_in_the_browser_the_job_list_pages(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    with served.client("alice") as client:
        parent = client.submit("countdown", {"steps": "1000", "interval": "1"}).job.request.id
        ids = [client.submit("echo", {"n": str(n)}, parent_id=parent).job.request.id for n in range(12)]
    _sign_in_in_browser(driver, served, "alice")
    driver.get(served.url + "/jobs?parent=" + urllib.parse.quote(parent, safe="") + "&order=asc&page_size=10")

    def shown(d: Any) -> list[str]:
        return [row.get_attribute("data-id") for row in d.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr")]

    _wait(driver, lambda d: shown(d) == ids[:10])
    assert driver.find_element(By.ID, "prev-page").get_attribute("disabled") is not None
    driver.find_element(By.ID, "next-page").click()
    _wait(driver, lambda d: _text(d, "page-number") == "Page 2" and shown(d) == ids[10:])
    assert driver.find_element(By.ID, "next-page").get_attribute("disabled") is not None
    driver.find_element(By.ID, "prev-page").click()
    _wait(driver, lambda d: _text(d, "page-number") == "Page 1" and shown(d) == ids[:10])
    # Newest first, from the filter form.
    driver.find_element(By.CSS_SELECTOR, "#order-filter option[value='desc']").click()
    driver.find_element(By.ID, "apply-filters").click()
    _wait(driver, lambda d: shown(d) == ids[::-1][:10])
    assert "order=desc" in driver.current_url
    with served.client("alice") as client:
        client.cancel(parent)


def test_in_the_browser_job_data_is_shown_as_text_never_run(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    hostile = '<img src=x onerror="document.title=\'owned\'"><script>document.title="owned"</script>'
    with served.client("alice") as client:
        job = client.submit("echo", {"<b>key</b>": hostile}, id="<i>x</i>\"'&").job
    _sign_in_in_browser(driver, served, "alice")
    driver.get(served.url + "/job?id=" + urllib.parse.quote(job.request.id, safe=""))
    _wait(driver, lambda d: _text(d, "job-state") == "FINISHED")
    assert _text(driver, "job-id") == job.request.id
    cells = [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "#job-data td")]
    assert cells == ["<b>key</b>", hostile]
    assert not driver.find_elements(By.CSS_SELECTOR, "main img, main script, main b, main i")
    assert "owned" not in driver.title
    driver.get(served.url + "/jobs?type=echo")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr"))
    assert not driver.find_elements(By.CSS_SELECTOR, "main img, main script, main i")
    assert "owned" not in driver.title


def test_in_the_browser_a_typed_output_is_shown_as_json(served: Served, browser: Any) -> None:
    from ajs_examples.proto.ajs.examples.v1.hash_pb2 import Algorithm, HashRequest

    driver = browser
    with served.client("alice") as client:
        task = HashRequest(data=b"dashboard", algorithm=Algorithm.ALGORITHM_SHA256, rounds=1)
        request_id = client.submit("hash", input=task).job.request.id
    _sign_in_in_browser(driver, served, "alice")
    driver.get(served.url + "/job?id=" + urllib.parse.quote(request_id, safe=""))
    _wait(driver, lambda d: _text(d, "job-state") == "FINISHED")
    digest = hashlib.sha256(b"dashboard").hexdigest()
    _wait(driver, lambda d: digest in _text(d, "job-output"))
    assert "ALGORITHM_SHA256" in _text(driver, "job-input")
