"""The built-in dashboard in a real browser: Debian's Chromium, driven by selenium through
Debian's chromium-driver, against `iot up --simulate` on the shipped ports. Sign in,
see the fleet and the devices, search, open a device and see its charts with points, send a
command and see its outcome, acknowledge an alert, and as a viewer see no write buttons; no
console errors anywhere. Chromium missing is a failure, never a skip.

With IOT_SCREENSHOTS=DIR (`make screenshots`), the run saves its screenshots there."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from infra.settings import Settings
from iot.supervisor import components
from tests.conftest import TOKENS
from tests.e2e.processes import iot_up

pytestmark = pytest.mark.e2e

INSTALL = (
    "install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
)
GATEWAY = "http://127.0.0.1:8082"
COMMANDS = "http://127.0.0.1:8080/api/v1"
DEVICES = 6
VIEWER, OPERATOR = (
    next(t for t, r in TOKENS.items() if r == role) for role in ("viewer", "operator")
)
WAIT_S = 45  # an upper bound for the page to show what the system already has


def executable(name: str, *candidates: str) -> str:
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise AssertionError(f"`{name}` not found: {INSTALL}")


@pytest.fixture(scope="module")
def system(migrated_module: Settings) -> Iterator[None]:
    """The whole system with a simulated fleet."""
    ports = {child.name: child.port for child in components() if child.port is not None}
    with iot_up(migrated_module, ports, "--simulate", str(DEVICES), tokens=TOKENS):
        yield


@pytest.fixture(scope="module")
def browser(system: None) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = executable("chromium", "chromium", "chromium-browser")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable("chromedriver", "chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The browser; after each test, nothing the page logged is an error."""
    console(browser)  # what an earlier test left
    yield browser
    errors = [e for e in console(browser) if e["level"] == "SEVERE"]
    assert not errors, errors


def shot(browser: webdriver.Chrome, name: str, height: int = 1000) -> None:
    """A screenshot into IOT_SCREENSHOTS (`make screenshots`), if set."""
    directory = os.environ.get("IOT_SCREENSHOTS")
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1400, height)
    time.sleep(0.5)  # the layout after the resize
    browser.save_screenshot(str(Path(directory) / f"{name}.png"))
    browser.set_window_size(1400, 1000)


def until(
    browser: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str
) -> Any:
    def attempt(driver: webdriver.Chrome) -> Any:
        try:
            return condition(driver)
        except (StaleElementReferenceException, WebDriverException):
            return False  # the page re-rendered under us: look again

    return WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(attempt, message=what)


def attribute(element: WebElement, name: str) -> str:
    value = element.get_attribute(name)
    assert value is not None, f"no {name} on {element.tag_name}"
    return value


def console(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    """What the page logged since the last call."""
    logged: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return logged


def find(browser: webdriver.Chrome, css: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, css)


def text(browser: webdriver.Chrome, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def signed_out(browser: webdriver.Chrome) -> None:
    """The page as a new tab shows it: no token in the session."""
    # Cleared on a page of the same origin that runs no script: the dashboard itself, signed
    # in, would write the token back when its own sign-in on load completes.
    browser.get(GATEWAY + "/ui/config.json")
    browser.execute_script("sessionStorage.clear()")
    browser.get(GATEWAY + "/")
    until(browser, lambda b: b.find_element(By.ID, "signin-token").is_displayed(), "sign-in form")


def sign_in(browser: webdriver.Chrome, token: str) -> None:
    signed_out(browser)
    box = browser.find_element(By.ID, "signin-token")
    box.clear()
    box.send_keys(token)
    browser.find_element(By.ID, "signin-submit").click()
    until(browser, lambda b: b.find_element(By.ID, "who-role").text != "", "signed in")


def test_before_sign_in_the_page_asks_for_a_token_and_calls_no_api(
    page: webdriver.Chrome,
) -> None:
    signed_out(page)
    page.execute_script("performance.clearResourceTimings()")
    page.refresh()
    until(page, lambda b: b.find_element(By.ID, "signin-token").is_displayed(), "sign-in form")
    assert not page.find_element(By.ID, "nav").is_displayed()
    shot(page, "sign-in", 700)
    called = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [url for url in called if "/api/v1/" in url], called


def test_a_wrong_token_is_refused_with_a_message(page: webdriver.Chrome) -> None:
    signed_out(page)
    page.find_element(By.ID, "signin-token").send_keys("not-a-token-of-this-system")
    page.find_element(By.ID, "signin-submit").click()
    until(page, lambda b: "not accepted" in text(b, "signin-error"), "the refusal")
    assert not page.find_element(By.ID, "nav").is_displayed()
    # the 401 itself is what the browser logs for the refused request: expected here
    logged = console(page)
    assert all("/api/v1/me" in e["message"] for e in logged if e["level"] == "SEVERE"), logged


def test_an_operator_signs_in_and_sees_the_fleet(page: webdriver.Chrome) -> None:
    sign_in(page, OPERATOR)
    assert text(page, "who-role") == "operator"
    until(page, lambda b: text(b, "fleet-devices") == str(DEVICES), "every device counted")
    until(page, lambda b: text(b, "fleet-online") == str(DEVICES), "every device online")
    until(
        page,
        lambda b: len(find(b, "#overview-devices tr[data-device]")) == DEVICES,
        "the device table",
    )
    until(
        page, lambda b: int(b.find_element(By.ID, "fleet-rpm").text or 0) > 0, "readings per minute"
    )
    until(page, lambda b: find(b, "#live.on"), "live updates connected")
    until(
        page,
        lambda b: (
            int(
                b.find_element(By.CSS_SELECTOR, "#fleet-spark svg").get_attribute("data-points")
                or 0
            )
            >= 2
        ),
        "the sparkline",
    )


def test_the_device_list_searches_and_opens_a_device_with_charts(
    page: webdriver.Chrome,
) -> None:
    sign_in(page, OPERATOR)
    page.get(GATEWAY + "/#/devices")
    until(page, lambda b: len(find(b, "#device-list tr[data-device]")) == DEVICES, "the list")
    search = page.find_element(By.ID, "filter-prefix")
    search.send_keys("sim-0003")
    page.find_element(By.CSS_SELECTOR, "#device-filters button[type=submit]").click()
    until(
        page,
        lambda b: (
            [r.get_attribute("data-device") for r in find(b, "#device-list tr[data-device]")]
            == ["sim-0003"]
        ),
        "only the device searched for",
    )
    page.find_element(By.CSS_SELECTOR, "#device-list a.device-link").click()
    until(page, lambda b: "sim-0003" in text(b, "device-title"), "the device page")
    page.find_element(By.CSS_SELECTOR, "#ranges button[data-range='15m']").click()

    def charted(b: webdriver.Chrome) -> dict[str, int]:
        cards = find(b, "#charts .chart-card")
        points = {
            attribute(c, "data-metric"): int(
                attribute(c.find_element(By.CSS_SELECTOR, "svg"), "data-points")
            )
            for c in cards
        }
        return points if points.get("temperature", 0) > 0 else {}

    points = until(page, charted, "a temperature chart with points")
    assert {"temperature", "humidity", "battery"} <= set(points), points
    assert find(page, "#charts .chart-card[data-metric=temperature] svg path.line")
    until(
        page,
        lambda b: (
            b.find_element(By.CSS_SELECTOR, "#timeline svg").get_attribute("data-segments") != "0"
        ),
        "the connectivity timeline",
    )
    until(page, lambda b: find(b, "#device-history tbody tr"), "the device's history")
    assert page.find_element(By.ID, "twin-desired").text


def test_an_operator_sends_a_command_and_sees_its_outcome(page: webdriver.Chrome) -> None:
    sign_in(page, OPERATOR)
    page.get(GATEWAY + "/#/devices/sim-0002")
    until(page, lambda b: b.find_element(By.ID, "command-form").is_displayed(), "the form")
    page.find_element(By.ID, "command-name").send_keys("echo")
    page.find_element(By.ID, "command-args").send_keys('{"answer": 42}')
    page.find_element(By.ID, "command-send").click()
    until(
        page,
        lambda b: text(b, "command-result").endswith(": acknowledged"),
        "the device's acknowledgement",
    )
    command_id = text(page, "command-result").split(":")[0]
    row = page.find_element(By.CSS_SELECTOR, f"#device-commands tr[data-command='{command_id}']")
    assert row.get_attribute("data-state") == "acknowledged"
    assert '"answer":42' in row.text.replace(" ", "")  # the simulator echoes the arguments
    if os.environ.get("IOT_SCREENSHOTS"):  # the charts at their finest range for the picture
        page.execute_script("window.scrollTo(0, 0)")  # from the form, under the header
        page.find_element(By.CSS_SELECTOR, "#ranges button[data-range='15m']").click()
        temperature = "#charts .chart-card[data-metric=temperature] svg"
        until(
            page,
            lambda b: (
                int(attribute(b.find_element(By.CSS_SELECTOR, temperature), "data-points")) >= 3
            ),
            "points to show",
        )
        shot(page, "device", 2200)


def test_an_operator_acknowledges_an_alert(page: webdriver.Chrome) -> None:
    # A rule every reading of one device breaks, so that an alert is open within a reading.
    rule = {
        "name": "Browser test",
        "metric": "temperature",
        "severity": "critical",
        "scope": {"device_ids": ["sim-0001"]},
        "condition": {"kind": "threshold", "op": ">", "value": -1000},
    }
    created = httpx.post(
        COMMANDS + "/rules", json=rule, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10
    )
    assert created.status_code == 201, created.text
    sign_in(page, OPERATOR)
    until(page, lambda b: find(b, "#overview-alerts button.ack"), "the alert on the overview")
    critical = "#fleet-severities [data-severity=critical]"
    until(
        page,
        lambda b: (
            b.find_element(By.CSS_SELECTOR, critical).get_attribute("textContent") == "1 critical"
        ),
        "counted by severity",
    )
    shot(page, "overview", 1100)
    page.get(GATEWAY + "/#/alerts")
    selector = "#alert-list tr[data-status=active] button.ack"
    until(page, lambda b: find(b, selector), "an open alert with its button")
    button = page.find_element(By.CSS_SELECTOR, selector)
    alert_id = attribute(button, "data-alert")
    assert alert_id.startswith("sim-0001.")
    shot(page, "alerts", 800)
    button.click()
    until(page, lambda b: "acknowledged" in text(b, "banner-text"), "the confirmation")
    acknowledged = httpx.get(
        f"{GATEWAY}/api/v1/alerts/{alert_id}",
        headers={"Authorization": f"Bearer {VIEWER}"},
        timeout=10,
    )
    assert acknowledged.json()["acknowledged"] is True, acknowledged.text
    assert acknowledged.json()["acknowledged_by"]
    assert not find(page, f"#alert-list button.ack[data-alert='{alert_id}']")


def test_a_viewer_sees_everything_but_no_write_buttons(page: webdriver.Chrome) -> None:
    sign_in(page, VIEWER)
    assert text(page, "who-role") == "viewer"
    page.get(GATEWAY + "/#/alerts")
    Select(page.find_element(By.ID, "alert-status")).select_by_value("")
    page.find_element(By.CSS_SELECTOR, "#alert-filters button[type=submit]").click()
    until(page, lambda b: find(b, "#alert-list tr[data-alert-row]"), "the alerts")
    assert not [b for b in find(page, "button.ack") if b.is_displayed()]
    page.get(GATEWAY + "/#/devices/sim-0002")
    until(page, lambda b: find(b, "#device-commands tr[data-command]"), "the commands sent")
    assert not page.find_element(By.ID, "command-form").is_displayed()
    page.find_element(By.ID, "sign-out").click()
    until(page, lambda b: b.find_element(By.ID, "signin-token").is_displayed(), "signed out")
    assert page.execute_script("return sessionStorage.getItem('iot-token')") is None
