"""A suite's history in headless Chromium: the chart renders under the page's CSP, marks the regression, and
its marker opens the comparison; a run page compares with the previous run."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from seed_data import HISTORY_SUITE
from test_evals_page import assert_no_script_ran, navigate_by, row

BAD_RED = "rgb(180, 35, 24)"  # --bad in page.css


def csp_violations(browser) -> list[str]:
    """Console errors Chromium logged for blocked content (an inline style, a script) since the last call."""
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_history_chart_marks_the_regression_and_opens_the_comparison(history_server, browser, shot):
    h = history_server.history
    browser.get(f"{history_server.url}/evals")
    csp_violations(browser)  # start from a clean log
    navigate_by(browser, row(browser, h.runs[-1]).find_element(By.CSS_SELECTOR, "td.suite a"))
    assert browser.current_url == f"{history_server.url}/evals/suites/{HISTORY_SUITE}"

    chart = browser.find_element(By.ID, "history-chart")
    assert chart.size["width"] >= 600 and chart.size["height"] >= 200  # laid out, not collapsed
    points = browser.find_elements(By.CSS_SELECTOR, "#history-chart circle.point.rate")
    assert [p.get_attribute("class") for p in points].count("point rate regressed") == 1 and len(points) == 7
    # Oldest on the left; the 71 s night is the highest point of the duration panel.
    xs = [float(p.get_attribute("cx")) for p in points]
    assert xs == sorted(xs)
    durations = browser.find_elements(By.CSS_SELECTOR, "#history-chart circle.point.duration")
    assert min(durations, key=lambda p: float(p.get_attribute("cy"))) == durations[4]

    markers = browser.find_elements(By.CSS_SELECTOR, "#history-chart a.regression")
    assert len(markers) == 1
    tooltip = markers[0].find_element(By.TAG_NAME, "title").get_attribute("textContent")
    assert tooltip == (f"2 regressions since {h.before_regression}: capital, divide. "
                       "Click to compare the two runs.")
    triangle = markers[0].find_element(By.CSS_SELECTOR, "path.marker")
    # The stylesheet (style-src 'self') reaches the inline SVG; nothing inline was needed, nothing was blocked.
    assert browser.execute_script("return getComputedStyle(arguments[0]).fill", triangle) == BAD_RED
    assert csp_violations(browser) == []
    assert_no_script_ran(browser)
    shot("suite-history")

    navigate_by(browser, triangle)
    assert "/evals/compare?" in browser.current_url
    assert browser.find_element(By.ID, "compare-a").get_attribute("value") == h.before_regression
    assert browser.find_element(By.ID, "compare-b").get_attribute("value") == h.regressed
    regressions = browser.find_elements(By.CSS_SELECTOR, "#regression tr.change")
    assert [r.get_attribute("data-case") for r in regressions] == ["capital", "divide"]
    assert "2 regressions, 0 fixes" in browser.find_element(By.ID, "compare-summary").text
    assert csp_violations(browser) == []
    shot("compare")


def test_run_page_compares_with_the_previous_run_or_a_picked_one(history_server, browser, shot):
    h = history_server.history
    browser.get(f"{history_server.url}/evals/runs/{h.runs[-1]}")
    navigate_by(browser, browser.find_element(By.ID, "compare-previous"))
    assert browser.find_element(By.ID, "compare-a").get_attribute("value") == h.runs[-2]
    assert [r.get_attribute("data-case") for r in browser.find_elements(By.CSS_SELECTOR, "#fix tr.change")] == [
        "capital"]

    browser.get(f"{history_server.url}/evals/runs/{h.runs[-1]}")
    browser.find_element(By.ID, "compare-with").send_keys(h.regressed[:17])  # a unique prefix will do
    shot("compare-form")
    navigate_by(browser, browser.find_element(By.ID, "compare-submit"))
    assert browser.find_element(By.ID, "compare-a").get_attribute("value") == h.regressed
    fixed = [r.get_attribute("data-case") for r in browser.find_elements(By.CSS_SELECTOR, "#fix tr.change")]
    assert fixed == ["capital", "divide"]
    shot("compare-picked")
