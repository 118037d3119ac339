"""The web console in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium, against a console of tests/apps/web_app.py with a real worker.

Skipped when selenium or the browser is missing, unless RARE_REQUIRE_BROWSER=1 (CI sets it).
RARE_WEB_SCREENSHOTS=DIR saves the pages it sees there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_cli import bug_message, drain, publish
from tests.support import Events, Worker, wait_for
from tests.web_support import WebServer

APP = "tests.apps.web_app"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
EVIL = "<script>window.pwned=1</script>"


def _missing() -> str | None:
    try:
        import flask  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "chromium / chromedriver are not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = _missing()
    if problem:
        if os.environ.get("RARE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test cannot run: {problem}")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="rare-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(env, workdir):
    w = Worker(APP, ["web.work", "web.other"], env, workdir, name="webb", extra=["-E"]).wait_ready()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def console(env, worker):
    server = WebServer("-A", APP)
    yield server
    server.stop()


def shot(driver, name: str) -> None:
    where = os.environ.get("RARE_WEB_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(max(height + 40, 700), 2400))
        driver.save_screenshot(str(Path(where) / f"{name}.png"))
        driver.set_window_size(1400, 1000)


def test_find_filter_open_and_requeue_in_a_browser(vhost, browser, console, workdir):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    drain(vhost.url, "web.work.bugs")
    tag = f"browser-{uuid.uuid4().hex[:6]}"
    wanted = bug_message("web.record", [tag], queue="web.work", reason="exhausted", attempts=2,
                         error="gateway down", failed_ago=120)
    others = [bug_message("web.record", [f"other-{i}"], queue="web.work", reason="expired") for i in range(3)]
    hostile = bug_message(f"web.{EVIL}", [EVIL], queue="web.work", reason="bug", error=f"boom {EVIL}")
    publish(vhost.url, "web.work.bugs", [others[0], wanted, hostile, *others[1:]])
    task_id = wanted.headers["id"]
    runs = Events(workdir / "web-events.jsonl")
    d = browser

    def element(css: str, timeout: float = 30):
        return wait_for(lambda: (found := d.find_elements(By.CSS_SELECTOR, css)) and found[0], timeout, 0.1, css)

    def now(how: str, what: str, act):
        """``act(element)`` on the element found now, or None: the overview replaces its tables as it
        refreshes, so an element found a moment ago may be gone."""
        try:
            return act(d.find_element(how, what))
        except (StaleElementReferenceException, NoSuchElementException):
            return None

    d.get(console.start_url)  # the address it printed, with its token: the browser keeps it as a cookie
    bugs_cell = "//a[@data-queue='web.work.bugs']/../following-sibling::td[1]"
    wait_for(lambda: "5" in (now(By.XPATH, bugs_cell, lambda cell: cell.text) or ""), 30, 0.2,
             "the overview to show 5 bugs")
    shot(d, "overview")
    refreshed = wait_for(lambda: re.fullmatch(r"refreshed (\d\d:\d\d:\d\d) UTC, every \d+ s",
                                              now(By.ID, "refresh-state", lambda e: e.text) or ""), 30, 0.2,
                         "the overview to refresh")
    shown = time.strptime(refreshed.group(1), "%H:%M:%S")  # the time in UTC, 24-hour (not the browser's 12-hour clock)
    off = abs((shown.tm_hour * 3600 + shown.tm_min * 60 + shown.tm_sec) - time.time() % 86400)
    assert min(off, 86400 - off) < 60
    wait_for(lambda: now(By.CSS_SELECTOR, 'a.queue-link[data-queue="web.work.bugs"]', lambda link: link.click() or True),
             20, 0.2, "the bug queue's link to take a click")

    element("#filters")  # the page (after the read)
    assert d.execute_script("return window.pwned === undefined")
    assert EVIL in d.page_source.replace("&lt;", "<").replace("&gt;", ">")  # shown as text
    task_box = d.find_element(By.NAME, "task")
    task_box.clear()
    task_box.send_keys("web.rec*")
    d.find_element(By.ID, "apply-filter").click()
    wait_for(lambda: "task web.rec*" in (now(By.ID, "matching", lambda e: e.text) or ""), 20, 0.1,
             "the filter")  # the filtered page replaces the one the click was on
    shown = [row.get_attribute("data-task") for row in d.find_elements(By.CSS_SELECTOR, "tr.message-row")]
    assert shown == ["web.record"] * 4
    shot(d, "queue")

    d.find_element(By.XPATH, f"//a[@class='message-link' and normalize-space()='{task_id}']").click()
    assert element("#task-id").text == task_id
    assert tag in d.find_element(By.ID, "args").text and "gateway down" in d.find_element(By.ID, "error").text
    shot(d, "message")
    d.find_element(By.ID, "requeue-one").click()
    try:
        question = element("#question").text
    except AssertionError:
        raise AssertionError(d.current_url + " " + d.page_source[-3000:]) from None
    assert question.startswith("Requeue 1 message (this message) from web.work.bugs to web.work (1)"), question
    d.find_element(By.ID, "confirm-button").click()
    result = element("#job-result", 60).text
    assert result == "requeued 1 message from web.work.bugs to web.work (1)"

    run = wait_for(lambda: runs.of(task_id, "run"), 30, 0.1, "the requeued task to run on the worker")
    assert run[0]["attempt"] == 1 and run[0]["tag"] == tag

    d.find_element(By.ID, "back").click()  # the queue again: the requeued one is gone, the others stay
    element("#filters")
    ids = [row.get_attribute("data-id") for row in d.find_elements(By.CSS_SELECTOR, "tr.message-row")]
    assert task_id not in ids and len(ids) == 4

    d.get(console.url + "/queue?q=web.work.bugs&reason=bug")
    element("a.message-link").click()
    title = element("#task-name").text
    assert title == f"web.{EVIL}"  # the hostile name, as text
    assert d.find_element(By.ID, "args").text == json.dumps([EVIL], indent=2)
    assert d.execute_script("return window.pwned === undefined")
    assert not d.find_elements(By.XPATH, "//script[contains(., 'pwned')]")
    shot(d, "hostile")
    drain(vhost.url, "web.work.bugs")


def test_a_failure_group_and_an_edit_in_a_browser(vhost, browser, console, workdir):
    """Choose a failure group, open one of its messages, fix its arguments and requeue it edited: the
    worker runs the edited copy (screenshots: groups, edit)."""
    from selenium.webdriver.common.by import By

    drain(vhost.url, "web.work.bugs")
    timeouts = [bug_message("web.record", [f"card-{i}"], queue="web.work", reason="exhausted", attempts=2,
                            error=f"gateway 10.0.0.{i} timed out after {30 + i} s") for i in range(3)]
    other = bug_message("web.record", ["x"], queue="web.work", reason="bug", error="no such customer")
    publish(vhost.url, "web.work.bugs", [timeouts[0], other, *timeouts[1:]])
    runs = Events(workdir / "web-events.jsonl")
    d = browser

    def element(css: str, timeout: float = 30):
        return wait_for(lambda: (found := d.find_elements(By.CSS_SELECTOR, css)) and found[0], timeout, 0.1, css)

    d.get(console.start_url)
    d.get(console.url + "/queue?q=web.work.bugs")
    element("#rescan").click()  # the queue was emptied and filled to the same depth behind the console's back
    wait_for(lambda: "no such customer" in d.page_source, 30, 0.2, "the queue read again")
    element("#groups")
    rows = {r.get_attribute("data-group"): r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.group-row")}
    [group] = [g for g, text in rows.items() if "timed out" in text]  # one group for the three timeouts
    assert len(rows) == 2 and " 3 " in f" {rows[group]} ", rows
    shot(d, "groups")
    d.find_element(By.CSS_SELECTOR, f'tr.group-row[data-group="{group}"] a.group-link').click()
    wait_for(lambda: sorted(r.get_attribute("data-id") for r in d.find_elements(By.CSS_SELECTOR, "tr.message-row"))
             == sorted(m.headers["id"] for m in timeouts), 20, 0.1, "the group's three messages, and only them")

    task_id = timeouts[1].headers["id"]
    d.find_element(By.XPATH, f"//a[@class='message-link' and normalize-space()='{task_id}']").click()
    args = element("#edit-args")
    assert json.loads(args.get_attribute("value")) == ["card-1"]
    args.clear()
    args.send_keys('["card-1-fixed"]')
    d.find_element(By.ID, "edit-by").send_keys("oncall-anna")
    d.find_element(By.ID, "edit-requeue").click()
    question = element("#question").text
    assert "edited by oncall-anna" in question and "card-1-fixed" in d.find_element(By.ID, "edit").text, question
    shot(d, "edit")
    d.find_element(By.ID, "confirm-button").click()
    assert element("#job-result", 60).text.startswith("requeued 1 message from web.work.bugs to web.work")
    run = wait_for(lambda: runs.of(task_id, "run"), 30, 0.1, "the edited copy to run on the worker")
    assert run[0]["tag"] == "card-1-fixed" and run[0]["attempt"] == 1
    drain(vhost.url, "web.work.bugs")
