"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real daemon: sign in, find a dead letter, open it, replay it and see the
function invoked and the record gone; purge with confirmation; a read token sees no buttons and
its forged POSTs are refused. A screenshot of every page goes to test-artifacts/console/."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from bridge.testing import free_port

from .conftest import DaemonProcess, Project, wait_for

pytestmark = pytest.mark.integration

ADMIN = "admin-token-0123456789abcdef"
READER = "read-only-token-0123456789ab"
SCOPED = "g-only-admin-token-0123456789"
INVOKER = "invoke-only-token-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

HANDLER = """
import os

def main_handler(event, context):
    print("handling", event.get("n"))
    if os.path.exists(os.environ["FAIL_FLAG"]):
        raise ValueError("the flag says fail")
    with open(os.environ["OUT"], "a") as f:
        f.write(context.request_id + "\\n")
    return "ok"
"""


#: an element of a page still loading is waited for this long, not missed
IMPLICIT_WAIT_S = 5


def absent(browser: WebDriver, by: str, value: str) -> bool:
    """No such element on the page as loaded. The pages are rendered by the server (nothing
    is added to them after load), so this asks without the implicit wait, which would
    otherwise spend its whole time on every element rightly missing."""
    browser.implicitly_wait(0)
    try:
        return not browser.find_elements(by, value)
    finally:
        browser.implicitly_wait(IMPLICIT_WAIT_S)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert os.access(exe, os.X_OK), f"{exe} missing: `make services` installs it (apt)"
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(IMPLICIT_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def console(project: Project, daemon: Callable[..., DaemonProcess]) -> Iterator[dict[str, Any]]:
    port = free_port()
    flag = project.root / "fail.flag"
    flag.touch()
    project.function("f", HANDLER)
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"
        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "boss"
        secret = "{ADMIN}"
        actions = ["admin"]
        [[api.tokens]]
        name = "viewer"
        secret = "{READER}"
        actions = ["read"]
        [[api.tokens]]
        name = "g-admin"
        secret = "{SCOPED}"
        actions = ["admin"]
        functions = ["g"]
        [[api.tokens]]
        name = "invoker"
        secret = "{INVOKER}"
        actions = ["invoke"]
        [functions.f]
        code = "functions/f"
        environment = {{ OUT = "@OUT@", FAIL_FLAG = "{flag}" }}
        [functions.f.async]
        retry_attempts = 0
        [functions.g]
        code = "functions/f"
        environment = {{ OUT = "@OUT@", FAIL_FLAG = "{flag}" }}
        [functions.g.async]
        retry_attempts = 0
        [triggers.new-year]
        type = "timer"
        function = "g"
        cron = "0 0 0 1 1 * *"
        """
    )
    d = daemon(cfg)
    d.wait_log("ready")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {"base": f"http://127.0.0.1:{port}", "flag": flag, "project": project, "daemon": d}


def api(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {ADMIN}")
    req.add_header("X-Invocation-Type", "Event")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def dead_letter(base: str, n: int, function: str = "f") -> str:
    """Send an event that fails and wait for its dead letter; its request id."""
    status, got = api(base, "POST", f"/functions/{function}/invocations", {"n": n})
    assert status == 202, got
    rid: str = got["RequestId"]
    wait_for(lambda: api(base, "GET", f"/deadletters/{rid}")[0] == 200, what="the dead letter")
    return rid


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def click_to(driver: WebDriver, element: Any, url_part: str) -> None:
    """Click a link or button and wait for the page it leads to."""
    element.click()
    wait_for(lambda: url_part in driver.current_url, what=f"a page at ...{url_part}...")


def sign_in(driver: WebDriver, base: str, token: str) -> None:
    driver.get(base + "/ui/")
    assert "/ui/login" in driver.current_url
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(lambda: driver.current_url.endswith("/ui/"), what="the overview after signing in")


def test_admin_finds_opens_and_replays_a_dead_letter_then_purges_one(
    console: dict[str, Any], browser: WebDriver
) -> None:
    base, project = console["base"], console["project"]
    rid = dead_letter(base, 1)
    other = dead_letter(base, 2)

    # Given a signed-in admin (a wrong token is refused first)
    browser.get(base + "/ui/login")
    shot(browser, "login")
    browser.find_element(By.NAME, "token").send_keys("not-a-token-at-all-000")
    browser.find_element(By.ID, "sign-in").click()
    assert "unknown token" in browser.find_element(By.ID, "login-error").text
    sign_in(browser, base, ADMIN)
    cookie = wait_for(lambda: browser.get_cookie("bridge_console"), what="the session cookie")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert ADMIN not in browser.page_source
    assert browser.find_element(By.ID, "daemon-state").text == "running"
    assert "f" in browser.find_element(By.ID, "functions").text
    triggers = browser.find_element(By.ID, "triggers").text
    assert "new-year" in triggers and "-01-01 00:00:00" in triggers
    assert "connected" in triggers and "disconnected" not in triggers
    shot(browser, "overview")

    # When they filter the dead letters by function and open one
    click_to(browser, browser.find_element(By.LINK_TEXT, "Dead letters"), "/deadletters")
    Select(browser.find_element(By.NAME, "function")).select_by_value("f")
    click_to(browser, browser.find_element(By.CSS_SELECTOR, "#filters button"), "function=f")
    assert browser.find_element(By.ID, "total").text == "2"
    shot(browser, "deadletters")
    browser.get(base + "/ui/deadletters?function=f&to=2020-01-01T00:00")  # before them all
    assert browser.find_element(By.ID, "total").text == "0"
    browser.get(base + "/ui/deadletters?function=f&from=2020-01-01T00:00&to=2100-01-01T00:00")
    assert browser.find_element(By.ID, "total").text == "2"
    row = browser.find_element(By.CSS_SELECTOR, f'tr.dl[data-id="{rid}"]')
    click_to(browser, row.find_element(By.TAG_NAME, "a"), f"/deadletters/{rid}")
    assert browser.find_element(By.ID, "dl-id").text == rid
    assert json.loads(browser.find_element(By.ID, "event").text) == {"n": 1}
    assert "the flag says fail" in browser.page_source
    shot(browser, "deadletter")

    # ...and replay it once the function is fixed
    console["flag"].unlink()
    click_to(browser, browser.find_element(By.ID, "replay"), "done=")
    assert browser.find_element(By.ID, "done").text == "replayed 1"
    # Then the function ran it (same request id) and the record is gone
    wait_for(lambda: rid in project.out.read_text() if project.out.exists() else False)
    assert absent(browser, By.CSS_SELECTOR, f'tr.dl[data-id="{rid}"]')
    assert api(base, "GET", f"/deadletters/{rid}")[0] == 404

    # The function page lists the invocation; its log lines load in place (htmx)
    def invocation_listed() -> bool:
        browser.get(base + "/ui/functions/f")  # stored by the log store's writer shortly
        return "success" in browser.find_element(By.ID, "invocations").text

    wait_for(invocation_listed, what="the replayed invocation on the function page")
    browser.find_element(By.CSS_SELECTOR, "#invocations button").click()
    wait_for(lambda: "START RequestId" in browser.find_element(By.ID, "log-1").text)
    assert "handling 1" in browser.find_element(By.ID, "log-1").text
    shot(browser, "function")
    browser.get(base + f"/ui/invocations/{rid}")
    assert "REPORT RequestId: " + rid in browser.find_element(By.ID, "logs").text
    shot(browser, "invocation")
    browser.get(base + "/ui/retries")
    shot(browser, "retries")

    # Purging asks first, then deletes
    browser.get(base + "/ui/deadletters")
    browser.find_element(By.CSS_SELECTOR, f'input[name="ids"][value="{other}"]').click()
    click_to(browser, browser.find_element(By.ID, "purge-selected"), "/purge")
    assert "Purge 1 dead letter?" in browser.find_element(By.TAG_NAME, "h1").text
    assert api(base, "GET", f"/deadletters/{other}")[0] == 200
    shot(browser, "purge-confirm")
    click_to(browser, browser.find_element(By.ID, "confirm-purge"), "done=")
    assert browser.find_element(By.ID, "done").text == "purged 1"
    assert api(base, "GET", f"/deadletters/{other}")[0] == 404


def test_a_read_token_sees_no_buttons_and_forged_posts_are_refused(
    console: dict[str, Any], browser: WebDriver
) -> None:
    base = console["base"]
    rid = dead_letter(base, 7)
    sign_in(browser, base, READER)
    assert browser.find_element(By.ID, "token-name").text == "viewer"

    browser.get(base + "/ui/deadletters")
    assert browser.find_element(By.ID, "total").text == "1"
    for button in ("replay-selected", "replay-all", "purge-selected", "purge-all"):
        assert absent(browser, By.ID, button)
    assert absent(browser, By.CSS_SELECTOR, 'input[type="checkbox"]')
    shot(browser, "deadletters-read")
    browser.get(base + f"/ui/deadletters/{rid}")
    assert absent(browser, By.ID, "replay")
    assert absent(browser, By.ID, "purge")
    shot(browser, "deadletter-read")

    # A POST forged from the page: with the session's own CSRF token (read may not act) and
    # without one (refused before anything else)
    csrf = browser.find_element(By.CSS_SELECTOR, 'input[name="csrf"]').get_attribute("value")
    post = """
        const [body, done] = arguments;
        fetch('/ui/deadletters/replay', {method: 'POST', body: new URLSearchParams(body)})
            .then(r => r.text().then(t => done([r.status, t])));
    """
    status, text = browser.execute_async_script(post, {"csrf": csrf, "ids": rid})
    assert status == 403 and "may only read" in text
    status, text = browser.execute_async_script(post, {"ids": rid, "scope": "all"})
    assert status == 403
    assert api(base, "GET", f"/deadletters/{rid}")[0] == 200

    # Signed out, the session is gone: the same cookie no longer works
    click_to(browser, browser.find_element(By.CSS_SELECTOR, ".logout button"), "/ui/login")
    browser.get(base + "/ui/deadletters")
    assert "/ui/login" in browser.current_url


class Browserless:
    """A cookie-keeping HTTP client for what a browser would not send (foreign Origin)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def request(
        self, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with self.opener.open(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def csrf(self) -> str:
        _, html = self.request("/ui/deadletters")
        m = re.search(r'name="csrf" value="([^"]+)"', html)
        assert m, html
        return m.group(1)


def test_admin_acts_only_within_its_function_scope_and_origin_is_checked(
    console: dict[str, Any],
) -> None:
    base = console["base"]
    of_f, of_g = dead_letter(base, 1, "f"), dead_letter(base, 2, "g")

    refused = Browserless(base)
    status, html = refused.request("/ui/login", {"token": INVOKER})
    assert status == 401 and "may not read" in html

    c = Browserless(base)
    status, html = c.request("/ui/login", {"token": SCOPED})
    assert status == 200 and 'id="token-name">g-admin<' in html
    _, html = c.request("/ui/deadletters")
    assert of_g in html and of_f not in html
    assert 'id="total">1<' in html
    assert c.request(f"/ui/deadletters/{of_f}")[0] == 404
    csrf = c.csrf()

    # a POST from another site is refused even with the right CSRF token
    status, _ = c.request(
        "/ui/deadletters/purge",
        {"csrf": csrf, "scope": "all", "confirm": "yes"},
        Origin="http://evil.example",
    )
    assert status == 403
    # naming f's dead letter by id does not reach it; purging "all" purges only g's
    c.request("/ui/deadletters/purge", {"csrf": csrf, "ids": of_f, "confirm": "yes"})
    status, html = c.request(
        "/ui/deadletters/purge", {"csrf": csrf, "scope": "all", "confirm": "yes"}
    )
    assert status == 200 and "purged 1" in html
    assert api(base, "GET", f"/deadletters/{of_g}")[0] == 404
    assert api(base, "GET", f"/deadletters/{of_f}")[0] == 200
