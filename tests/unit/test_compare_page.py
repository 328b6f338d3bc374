"""The compare view and a suite's history page over real HTTP: content, links, refusals, escaping."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import quote

import pytest

from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.store import DuckDBStore

from compare_support import T0, record
from service_support import Client, ServiceThread

HOSTILE_SUITE = "<script>window.__xss=1</script>suite/with slash"
HOSTILE_CASE = '<img src=x onerror="window.__xss=2">'


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "compare-page.duckdb", faults=Faults(""))
    yield s
    s.close()


@pytest.fixture
def client(store):
    svc = ServiceThread(store, None)
    yield Client(svc)
    svc.stop()


def at(minute: int):
    return T0 + timedelta(minutes=minute)


def table_rows(text: str, table_id: str) -> list[str]:
    found = re.search(rf'<table[^>]* id="{table_id}">.*?</table>', text)
    return re.findall(r'data-case="([^"]*)"', found.group(0)) if found else []


def test_compare_view_lists_the_changes(store, client):
    a = record(store, "qa", {"add": "pass", "capital": "pass", "haiku": "fail", "old": "pass", "same": ("pass", 0.9)},
               at=at(0))
    b = record(store, "qa", {"add": "pass", "capital": "error", "haiku": "pass", "fresh": "fail",
                             "same": ("pass", 0.6)}, at=at(1))

    page = client.get(f"/evals/compare?a={a.id}&b={b.id[:17]}")
    assert page.status == 200, page.text
    text = page.text
    assert table_rows(text, "regression") == ["capital"] and table_rows(text, "fix") == ["haiku"]
    assert table_rows(text, "new") == ["fresh"] and table_rows(text, "removed") == ["old"]
    assert table_rows(text, "score-changes") == ["same"]
    assert "1 regression, 1 fix, 1 new, 1 removed, 2 unchanged" in text
    assert '<td class="num delta down">-20.0 pp</td>' in text  # pass rate 4/5 -> 3/5
    assert f'href="/evals/runs/{b.id}"' in text and 'href="/evals/suites/qa"' in text
    assert f'href="/evals/compare?a={b.id}&amp;b={a.id}" id="swap"' in text
    unchanged = re.search(r'<a href="([^"]+)">List them</a>', text).group(1).replace("&amp;", "&")
    assert table_rows(client.get(unchanged).text, "unchanged") == ["add", "same"]
    assert "script-src" not in page.headers["content-security-policy"]


def test_without_a_the_previous_finished_run_is_taken(store, client):
    first = record(store, "qa", {"x": "pass"}, at=at(0))
    other = record(store, "other", {"x": "fail"}, at=at(1))
    killed = record(store, "qa", {"x": "error"}, status=RunStatus.FAILED, cause="killed", at=at(2))
    resumed = record(store, "qa", {"x": "fail"}, parent=killed, at=at(3))

    page = client.get(f"/evals/compare?b={resumed.id}")
    assert page.status == 200
    assert f'id="compare-a" value="{first.id}"' in page.text  # not the attempt it resumed, not another suite
    assert table_rows(page.text, "regression") == ["x"]
    none = client.get(f"/evals/compare?b={first.id}")
    assert none.status == 404 and "no finished run of suite qa before run" in none.text

    # Any two finished runs can be compared; what deserves a second look is said.
    warned = client.get(f"/evals/compare?a={other.id}&b={killed.id}")
    assert warned.status == 200
    warnings = re.findall(r'<p class="warning" role="note">([^<]*)</p>', warned.text)
    assert warnings == ["the runs are of different suites (other and qa); cases are matched by name all the same",
                        f"run B ({killed.id}) was resumed by a later attempt, {resumed.id}, which holds that "
                        "invocation&#x27;s final results"]


def test_compare_refusals(store, client):
    done = record(store, "qa", {"x": "pass"}, at=at(0), run_id="20260105-090000-aaaaaa")
    record(store, "qa", {"x": "pass"}, at=at(1), run_id="20260105-090100-bbbbbb")
    running = record(store, "qa", {"x": "pass"}, at=at(2), finish=False)

    assert client.get("/evals/compare").status == 200  # the bare form
    assert client.get(f"/evals/compare?a={done.id}").status == 400
    missing = client.get(f"/evals/compare?a=nope&b={done.id}")
    assert missing.status == 404 and "a: no run with id &#x27;nope&#x27;" in missing.text
    ambiguous = client.get(f"/evals/compare?a=20260105-09&b={done.id}")
    assert ambiguous.status == 400 and "is ambiguous" in ambiguous.text
    live = client.get(f"/evals/compare?a={done.id}&b={running.id}")
    assert live.status == 409 and f"run {running.id} is still running" in live.text


def test_suite_page_charts_the_history_and_marks_regressions(store, client):
    verdicts = [{"a": "pass", "b": "pass", "c": "fail"}, {"a": "pass", "b": "pass", "c": "pass"},
                {"a": "pass", "b": "fail", "c": "error"}, {"a": "pass", "b": "pass", "c": "pass"}]
    runs = [record(store, "qa", v, at=at(i), duration_s=2.0 + i) for i, v in enumerate(verdicts)]
    record(store, "qa", {"a": "pass"}, at=at(9), finish=False)

    page = client.get("/evals/suites/qa")
    assert page.status == 200, page.text
    text = page.text
    assert "4 finished runs shown (5 runs in all, 1 running)" in text
    svg = re.search(r"<svg .*?</svg>", text).group(0)
    assert svg.count('<circle class="point rate') == 4
    markers = re.findall(r'<a href="([^"]+)" class="regression"><title>([^<]*)</title>', svg)
    assert markers == [(f"/evals/compare?a={runs[1].id}&amp;b={runs[2].id}",
                        f"2 regressions since {runs[1].id}: b, c. Click to compare the two runs.")]
    assert "style=" not in text and "<script" not in text
    history = re.findall(r'<tr class="history-run( regressed)?" data-run-id="([^"]+)"', text)
    assert history == [("", runs[3].id), (" regressed", runs[2].id), ("", runs[1].id), ("", runs[0].id)]
    assert "2 fixes" in text and "1 fix" in text

    # The oldest point shown is still compared with the run before it.
    two = client.get("/evals/suites/qa?limit=2").text
    assert two.count('<circle class="point rate') == 2 and two.count('class="regression"') == 1
    assert client.get("/evals/suites/qa?limit=0").status == 400
    assert "server-timing" in page.headers
    assert client.get("/evals/suites/nope").status == 404


def test_run_page_and_runs_list_link_to_the_new_views(store, client):
    first = record(store, "qa", {"x": "pass"}, at=at(0))
    second = record(store, "qa", {"x": "fail"}, at=at(1))

    run_page = client.get(f"/evals/runs/{second.id}").text
    assert f'href="/evals/compare?a={first.id}&amp;b={second.id}" id="compare-previous"' in run_page
    assert f'<input type="hidden" name="b" value="{second.id}">' in run_page
    assert f'<option value="{first.id}">' in run_page and f'<option value="{second.id}">' not in run_page
    assert 'href="/evals/suites/qa" id="suite-history"' in run_page
    assert "No earlier finished run of this suite." in client.get(f"/evals/runs/{first.id}").text
    assert '<td class="suite"><a href="/evals/suites/qa">qa</a></td>' in client.get("/evals").text


def test_hostile_suite_and_case_names_are_escaped(store, client):
    a = record(store, HOSTILE_SUITE, {HOSTILE_CASE: "pass", "ok": "pass"}, at=at(0))
    b = record(store, HOSTILE_SUITE, {HOSTILE_CASE: "fail", "ok": "pass"}, at=at(1))
    suite_url = f"/evals/suites/{quote(HOSTILE_SUITE, safe='')}"

    listing = client.get("/evals").text
    assert f'href="{suite_url}"' in listing
    pages = {
        "suite": client.get(suite_url),
        "compare": client.get(f"/evals/compare?a={a.id}&b={b.id}"),
        "run": client.get(f"/evals/runs/{b.id}"),
    }
    for name, page in pages.items():
        assert page.status == 200, (name, page.text)
        assert "<script>" not in page.text and "<img" not in page.text, name
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;suite/with slash" in page.text, name
    assert "&lt;img src=x onerror=&quot;window.__xss=2&quot;&gt;" in pages["compare"].text
    # The case's name reaches the marker's tooltip, escaped too.
    assert "1 regression since" in pages["suite"].text and "&lt;img src=x" in pages["suite"].text
