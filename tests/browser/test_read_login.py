"""A reader behind a read token, in headless Chromium: sent to the login form, logs in with the read token, reads."""

from __future__ import annotations

from urllib.parse import urlsplit

from selenium.webdriver.common.by import By

from seed_data import READ_TOKEN
from test_evals_page import listed, navigate_by


def test_a_reader_logs_in_with_the_read_token_and_sees_the_runs(read_server, browser, shot):
    s = read_server.seeded
    browser.delete_all_cookies()  # cookies are per host, not per port: start without the other servers' sessions
    try:
        browser.get(f"{read_server.url}/evals?status=completed")
        assert urlsplit(browser.current_url).path == "/evals/login", "no credential: sent to the login form"
        assert not listed(browser)
        shot("login")
        browser.find_element(By.ID, "token").send_keys(READ_TOKEN)
        navigate_by(browser, browser.find_element(By.ID, "login"))

        here = urlsplit(browser.current_url)
        assert here.path == "/evals" and "status=completed" in here.query, "back where the reader was sent from"
        assert browser.title.startswith("Runs") and s.completed in listed(browser)
        assert "Logged in to read" in browser.find_element(By.ID, "notice").text
        assert "read-only" in browser.find_element(By.CSS_SELECTOR, "header .who").text
        shot("runs")

        browser.get(f"{read_server.url}/evals/runs/{s.stuck}")  # a stuck run: readable, not terminable
        assert browser.find_elements(By.ID, "login-to-terminate") and not browser.find_elements(By.ID, "terminate")

        browser.get(f"{read_server.url}/metrics")  # the read cookie goes to /metrics as well
        assert "evalrunner_runs" in browser.page_source
    finally:
        browser.delete_all_cookies()
