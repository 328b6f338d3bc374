"""What a person does on /evals, in headless Chromium: see, filter, open, log in, terminate; and no injected script runs."""

from __future__ import annotations

from urllib.parse import quote

from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from seed_data import ADMIN_TOKEN, SCRIPT_CASE, SCRIPT_ERROR, SCRIPT_OUTPUT, SCRIPT_SUITE


def navigate_by(browser, element) -> None:
    """Click a link or submit button and wait until the next page has replaced this one."""
    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 15).until(expected_conditions.staleness_of(page))
    WebDriverWait(browser, 15).until(lambda b: b.execute_script("return document.readyState") == "complete")


def row(browser, run_id):
    return browser.find_element(By.CSS_SELECTOR, f'tr.run[data-run-id="{run_id}"]')


def listed(browser) -> list[str]:
    return [tr.get_attribute("data-run-id") for tr in browser.find_elements(By.CSS_SELECTOR, "tr.run")]


def assert_no_script_ran(browser):
    try:
        alert = browser.switch_to.alert
        text = alert.text
        alert.dismiss()
        raise AssertionError(f"an alert opened: {text!r}")
    except NoAlertPresentException:
        pass
    assert browser.execute_script("return window.__xss === undefined") is True


def test_see_filter_open_login_and_terminate_the_stuck_run(server, browser, shot):
    s = server.seeded
    browser.get(f"{server.url}/evals")
    shot("runs")
    assert browser.title.startswith("Runs")

    # A running, a completed and a stuck run, each as it is.
    assert {s.running, s.completed, s.stuck} <= set(listed(browser))
    running = row(browser, s.running)
    assert "status-running" in running.get_attribute("class") and "stuck" not in running.get_attribute("class")
    assert running.find_element(By.CSS_SELECTOR, "td.pass").text == "1"  # live count from its case rows
    assert row(browser, s.completed).find_element(By.CSS_SELECTOR, ".badge").text == "completed"
    stuck = row(browser, s.stuck)
    assert "stuck" in stuck.get_attribute("class")
    assert stuck.find_element(By.CSS_SELECTOR, ".badge.stuck").text == "STUCK"
    assert "owner process is gone" in stuck.find_element(By.CSS_SELECTOR, ".why").text
    banner = browser.find_element(By.ID, "stuck-banner")
    assert "1 stuck run" in banner.text and s.stuck in banner.text

    # Filter by status, then by suite, with the GET form.
    Select(browser.find_element(By.ID, "status")).select_by_value("completed")
    navigate_by(browser, browser.find_element(By.ID, "apply"))
    assert "status=completed" in browser.current_url
    assert listed(browser) == [s.completed]
    shot("filtered-completed")
    Select(browser.find_element(By.ID, "status")).select_by_value("")
    suite = browser.find_element(By.ID, "suite")
    suite.clear()
    suite.send_keys("qa-smoke")
    navigate_by(browser, browser.find_element(By.ID, "apply"))
    assert listed(browser) == [s.failed, s.completed]
    shot("filtered-suite")

    # Open a run's cases.
    navigate_by(browser, row(browser, s.completed).find_element(By.CSS_SELECTOR, "td.id a"))
    assert browser.find_element(By.ID, "run-id").text == s.completed
    cases = {tr.get_attribute("data-case"): tr for tr in browser.find_elements(By.CSS_SELECTOR, "tr.case")}
    assert set(cases) == {"add", "capital", "haiku"}
    assert cases["haiku"].find_element(By.CSS_SELECTOR, ".badge").text == "fail"
    assert cases["capital"].find_element(By.CSS_SELECTOR, "td.output").text == "Paris"
    assert not browser.find_elements(By.ID, "terminate-form")
    shot("run-cases")

    # The stuck run: read-only until logged in.
    browser.get(f"{server.url}/evals/runs/{s.stuck}")
    assert "owner process is gone" in browser.find_element(By.ID, "stuck").text
    assert not browser.find_elements(By.ID, "terminate-form")
    navigate_by(browser, browser.find_element(By.ID, "login-to-terminate"))
    assert ADMIN_TOKEN not in browser.page_source
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    shot("login")
    navigate_by(browser, browser.find_element(By.ID, "login"))
    assert browser.find_element(By.ID, "run-id").text == s.stuck  # back where we were
    assert "Logged in as admin" in browser.find_element(By.ID, "notice").text
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: scripts cannot read it
    assert ADMIN_TOKEN not in browser.page_source
    shot("stuck-run-logged-in")

    browser.find_element(By.ID, "reason").send_keys("runner host was rebooted")
    navigate_by(browser, browser.find_element(By.ID, "terminate"))
    assert "Run terminated" in browser.find_element(By.ID, "notice").text
    fields = browser.find_element(By.ID, "fields").text
    assert "failed" in fields and "manual" in fields and "runner host was rebooted" in fields
    assert not browser.find_elements(By.ID, "stuck")
    case_badges = {tr.get_attribute("data-case"): tr.find_element(By.CSS_SELECTOR, ".badge").text
                   for tr in browser.find_elements(By.CSS_SELECTOR, "tr.case")}
    assert case_badges == {"warmup": "pass", "long-one": "error"}  # its running case failed with it
    shot("terminated")

    browser.get(f"{server.url}/evals")
    gone = row(browser, s.stuck)
    assert gone.find_element(By.CSS_SELECTOR, ".badge").text == "failed"
    assert gone.find_element(By.CSS_SELECTOR, "td.cause").text == "manual"
    assert "stuck" not in gone.get_attribute("class")
    assert not browser.find_elements(By.ID, "stuck-banner")
    assert "stuck" not in row(browser, s.running).get_attribute("class")  # the healthy run is left alone
    shot("runs-after")


def test_script_in_suite_names_and_outputs_never_runs(server, browser, shot):
    s = server.seeded
    browser.get(f"{server.url}/evals")
    assert_no_script_ran(browser)
    assert row(browser, s.hostile).find_element(By.CSS_SELECTOR, "td.suite").text == SCRIPT_SUITE
    shot("runs")

    browser.get(f"{server.url}/evals?suite={quote(SCRIPT_SUITE)}")
    assert_no_script_ran(browser)
    assert listed(browser) == [s.hostile]
    assert browser.find_element(By.ID, "suite").get_attribute("value") == SCRIPT_SUITE

    browser.get(f"{server.url}/evals/runs/{s.hostile}")
    assert_no_script_ran(browser)
    case = browser.find_element(By.CSS_SELECTOR, "tr.case")
    assert case.find_element(By.CSS_SELECTOR, "td.name").text == SCRIPT_CASE
    assert case.find_element(By.CSS_SELECTOR, "td.output").text == SCRIPT_OUTPUT
    assert SCRIPT_ERROR in case.find_element(By.CSS_SELECTOR, "td.error-text").text
    assert SCRIPT_ERROR in browser.find_element(By.ID, "fields").text
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img, main b")
    # Hovering the would-be <b onmouseover> runs nothing either: it is text.
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(case.find_element(By.CSS_SELECTOR, "td.name")).perform()
    assert_no_script_ran(browser)
    shot("hostile-run")
