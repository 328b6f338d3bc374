"""The runner API's OpenAPI document: shipped in the package, served without a token, every route in it."""

from __future__ import annotations

import json
import urllib.request
from importlib import resources

import pytest
from service_support import ServiceThread

from evalrunner.faults import Faults
from evalrunner.service.openapi import SPEC_PATH, spec_text
from evalrunner.store import DuckDBStore, wire


@pytest.fixture
def service(tmp_path):
    store = DuckDBStore.open(tmp_path / "spec.duckdb", faults=Faults(""))
    svc = ServiceThread(store, "admin-token-for-the-spec")
    yield svc
    svc.stop()
    store.close()


def test_the_shipped_document_is_the_one_the_code_builds():
    shipped = resources.files("evalrunner.service").joinpath("openapi.json").read_text()
    assert shipped == spec_text(), (
        "regenerate: python -c 'from evalrunner.service.openapi import spec_text; print(spec_text(), end=\"\")' "
        "> operator/evalrunner/service/openapi.json")


def test_the_service_serves_it_without_a_token_and_it_lists_every_api_route(service):
    with urllib.request.urlopen(f"{service.origin}{SPEC_PATH}", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        spec = json.loads(resp.read())
    assert spec["openapi"].startswith("3.") and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    routes = {(r.method.lower(), r.resource.canonical) for r in service.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(wire.API_PREFIX) and r.method != "HEAD"}
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path != SPEC_PATH:
                assert {"200", "201"} & set(op["responses"]) and "401" in op["responses"], (method, path)
            if "{run_id}" in path:
                assert {"403", "404"} <= set(op["responses"]), (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= set(op["responses"]), (method, path)
