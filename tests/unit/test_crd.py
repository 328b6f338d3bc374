"""The EvalRun CRD: generated from the models, committed, structural, and validating what the models validate.

The API server's own verdict on the CRD is tested in tests/cluster; these
tests keep the generated file honest without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from evalrunner import crd
from evalrunner.models import EvalRunSpec, EvalRunStatus, EvalRunSuite, LockPolicy, Suite
from evalrunner.suites import suite_from_data

INLINE = {
    "name": "qa-smoke",
    "timeoutSeconds": 30,
    "concurrency": 8,
    "target": {"http": {"url": "http://model.default.svc/v1/chat/completions"}},
    "cases": [{"id": "add", "input": "2+2", "expected": "4", "scorer": {"name": "exact"}}],
}
BY_REF = {"name": "big", "configMapRef": {"name": "big-suite"}}


def spec(**overrides: Any) -> dict[str, Any]:
    return {"suites": [dict(INLINE), dict(BY_REF)], **overrides}


def schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


# ---------------------------------------------------------------- the committed file


def test_committed_crd_matches_the_models():
    assert crd.CRD_PATH.exists(), f"{crd.CRD_PATH} is missing; generate it with: {crd.REGENERATE}"
    assert crd.CRD_PATH.read_text() == crd.render(), (
        f"{crd.CRD_PATH.name} is out of date with operator/evalrunner/models.py; regenerate it with: "
        f"{crd.REGENERATE}"
    )


def test_module_prints_the_manifest(capsys):
    assert crd.main([]) == 0
    out = capsys.readouterr().out
    assert out == crd.render()
    assert yaml.safe_load(out) == crd.build_crd()


def test_names_scope_and_version():
    spec_ = crd.build_crd()["spec"]
    assert crd.build_crd()["metadata"]["name"] == "evalruns.evals.workshop.dev"
    assert spec_["group"] == "evals.workshop.dev"
    assert spec_["scope"] == "Namespaced"
    assert spec_["names"] == {
        "kind": "EvalRun",
        "listKind": "EvalRunList",
        "plural": "evalruns",
        "singular": "evalrun",
        "shortNames": ["er"],
        "categories": ["evals"],
    }
    [version] = spec_["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns():
    columns = {c["name"]: c for c in crd.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(columns)[:5] == ["Phase", "Suites", "Passed", "Failed", "Errored"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Suites"]["jsonPath"] == ".status.progress"
    assert columns["Passed"]["type"] == columns["Failed"]["type"] == columns["Errored"]["type"] == "integer"
    assert "priority" not in columns["Errored"], "`kubectl get evalruns` must show errored cases, not only -o wide"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    # every column's path exists in the status schema
    status = schema()["properties"]["status"]["properties"]
    for column in columns.values():
        if column["jsonPath"].startswith(".status."):
            assert column["jsonPath"].removeprefix(".status.") in status


# ---------------------------------------------------------------- structural schema


def test_schema_is_structural():
    for path, node in nodes(schema()):
        for forbidden in ("$ref", "$defs", "title", "default", "const", "oneOf", "allOf", "not"):
            assert forbidden not in node, f"{path or '<root>'}: {forbidden}"
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:  # only the int-or-string pattern, verbatim
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, path
        typed = "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"
        )
        assert typed, f"{path}: no type"
        if node.get("type") == "array":
            assert "items" in node, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}: {bound} must be a boolean in OpenAPI v3"


def test_every_spec_and_status_field_is_described():
    root = schema()
    for part in ("spec", "status"):
        for path, node in nodes(root["properties"][part], part):
            if path.endswith(("[]", "{}")) and node.get("type") != "object":
                continue  # a scalar list item or map value: its field's description covers it
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


def test_json_valued_fields_take_any_value_and_maps_keep_their_keys():
    case = schema()["properties"]["spec"]["properties"]["suites"]["items"]["properties"]["cases"]["items"]
    for name in ("input", "expected"):
        node = case["properties"][name]
        assert node["x-kubernetes-preserve-unknown-fields"] is True
        assert node["nullable"] is True
        assert "type" not in node and "x-kubernetes-int-or-string" not in node
    assert case["properties"]["metadata"]["type"] == "object"
    assert case["properties"]["metadata"]["x-kubernetes-preserve-unknown-fields"] is True
    assert case["required"] == ["id", "input"]


def test_list_maps_are_keyed_by_required_fields():
    for path, node in nodes(schema()):
        if node.get("x-kubernetes-list-type") == "map":
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in node["items"].get("required", []), f"{path}: list-map key {key} must be required"
    status = schema()["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["suites"]["x-kubernetes-list-map-keys"] == ["name"]
    suites = schema()["properties"]["spec"]["properties"]["suites"]
    assert suites["x-kubernetes-list-map-keys"] == ["name"]  # the API server refuses duplicate names


def test_cel_rules_are_bounded_for_the_cost_estimator():
    """A CEL rule's estimated cost is multiplied by the most items it can run over: every list above one is bounded."""

    def walk(node: dict[str, Any], path: str, unbounded: list[str]) -> None:
        if node.get("x-kubernetes-validations"):
            assert not unbounded, f"{path}: CEL rule under unbounded list(s) {unbounded}"
        if node.get("type") == "array":
            unbounded = unbounded + ([] if "maxItems" in node else [path])
            walk(node["items"], f"{path}[]", unbounded)
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}", unbounded)

    walk(schema(), "", [])
    suites = schema()["properties"]["spec"]["properties"]["suites"]
    assert suites["maxItems"] == 50
    cases = suites["items"]["properties"]["cases"]
    assert cases["maxItems"] == 10_000
    scorer = cases["items"]["properties"]["scorer"]
    assert scorer["properties"]["name"]["maxLength"] <= 16  # compared by the scorer's rule
    rules = [r["rule"] for r in suites["items"]["x-kubernetes-validations"]]
    assert "(has(self.cases) ? 1 : 0) + (has(self.dataset) ? 1 : 0) + (has(self.configMapRef) ? 1 : 0) == 1" in rules


def test_bounds_enums_patterns_and_defaults_in_descriptions():
    props = schema()["properties"]["spec"]["properties"]
    assert props["retries"]["minimum"] == 0 and props["retries"]["maximum"] == 10
    assert props["concurrencyPolicy"]["enum"] == ["Allow", "Forbid", "Replace"]
    assert "Default: Forbid." in props["concurrencyPolicy"]["description"]
    assert "Default: the controller's own image" in props["image"]["description"]
    suite = props["suites"]["items"]["properties"]
    assert suite["name"]["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    assert suite["name"]["maxLength"] == 40
    assert suite["timeoutSeconds"]["minimum"] == 0 and suite["timeoutSeconds"]["exclusiveMinimum"] is True
    memory = props["resources"]["properties"]["limits"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and memory["pattern"]
    status = schema()["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed"]
    condition = status["conditions"]["items"]
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert "oom_killed" in status["suites"]["items"]["properties"]["cause"]["enum"]


def test_unions_without_a_structural_form_are_refused():
    with pytest.raises(crd.SchemaError, match="union"):
        crd.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]})


# ---------------------------------------------------------------- the models behind it


def test_a_valid_spec_and_its_defaults():
    parsed = EvalRunSpec.model_validate(spec(resources={"limits": {"memory": "512Mi", "cpu": 1}}))
    assert parsed.image is None  # the controller's own image (--runner-image)
    assert parsed.retries == 0
    assert parsed.start_timeout_seconds == 120 and parsed.deadline_grace_seconds == 60
    assert parsed.resources.as_requirements() == {"limits": {"cpu": "1", "memory": "512Mi"}}
    inline, by_ref = parsed.suites
    assert inline.is_inline and not by_ref.is_inline
    assert by_ref.config_map_ref.key == "suite.yaml"


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        ({**INLINE, "configMapRef": {"name": "x"}}, "exactly one of `cases`"),
        ({"name": "empty"}, "exactly one of `cases`"),
        ({k: v for k, v in INLINE.items() if k != "target"}, "needs a `target`"),
        ({**BY_REF, "timeoutSeconds": 5}, "timeoutSeconds from the referenced suite file"),
        ({**INLINE, "name": "QA_smoke"}, "should match pattern"),
        ({**INLINE, "name": "x" * 41}, "at most 40 characters"),
        ({**INLINE, "cases": INLINE["cases"] * 2}, "duplicate case id(s): add"),
        ({**INLINE, "timeoutSeconds": 0}, "greater than 0"),
        ({**INLINE, "concurrencyPolicy": "Sometimes"}, "'Allow', 'Forbid' or 'Replace'"),
        ({**INLINE, "target": {"python": {"callable": "m:f"}, "http": {"url": "http://x"}}}, "exactly one of `python`"),
        ({**INLINE, "cases": [{"id": "c", "input": "x", "scorer": {"name": "custom"}}]}, "needs `callable"),
    ],
)
def test_invalid_suites_are_refused(suite, message):
    with pytest.raises(ValidationError) as err:
        EvalRunSpec.model_validate({"suites": [suite]})
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"suites": []}, "at least 1 item"),
        ({"suites": [dict(BY_REF), dict(BY_REF)]}, "duplicate suite name(s): big"),
        ({"retries": 11}, "less than or equal to 10"),
        ({"resources": {"limits": {"memory": "lots"}}}, "should match pattern"),
        ({"resources": {"limits": {"gpu": "1"}}}, "Extra inputs are not permitted"),
        ({"serviceAccountName": "Not_A_Name"}, "should match pattern"),
        ({"retrys": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_are_refused(overrides, message):
    with pytest.raises(ValidationError) as err:
        EvalRunSpec.model_validate(spec(**overrides))
    assert message in str(err.value)


def test_concurrency_policy_defaults_to_the_evalrun_s():
    parsed = EvalRunSpec.model_validate(
        spec(concurrencyPolicy="Allow", suites=[dict(INLINE), {**BY_REF, "concurrencyPolicy": "Replace"}])
    )
    assert parsed.policy_for(parsed.suite("qa-smoke")) is LockPolicy.ALLOW
    assert parsed.policy_for(parsed.suite("big")) is LockPolicy.REPLACE
    assert EvalRunSpec.model_validate(spec()).policy_for(EvalRunSuite.model_validate(INLINE)) is LockPolicy.FORBID


def test_an_inline_suite_is_a_suite_file():
    suite = EvalRunSuite.model_validate(INLINE).to_suite(LockPolicy.REPLACE)
    assert isinstance(suite, Suite)
    assert (suite.name, suite.timeout_seconds, suite.concurrency, suite.lock_policy) == (
        "qa-smoke", 30, 8, LockPolicy.REPLACE
    )
    # what a suite file with the same content gives
    assert suite == suite_from_data({**INLINE, "lockPolicy": "Replace"})
    with pytest.raises(ValueError, match="configMapRef suite"):
        EvalRunSuite.model_validate(BY_REF).to_suite(LockPolicy.FORBID)


# ---------------------------------------------------------------- dataset suites

DATASET = {"input": "question", "expected": "answer"}
SOURCES = {
    "configMapRef": {"configMapRef": {"name": "qa-data", "key": "cases.jsonl"}},
    "persistentVolumeClaim": {"persistentVolumeClaim": {"claimName": "datasets", "path": "qa/cases.parquet"}},
    "imagePath": {"imagePath": "/opt/data/cases.csv"},
}


def dataset_suite(**dataset: Any) -> dict[str, Any]:
    return {k: v for k, v in INLINE.items() if k != "cases"} | {"dataset": {**DATASET, **dataset}}


@pytest.mark.parametrize("source", SOURCES)
def test_a_dataset_suite_is_an_inline_suite_whose_file_names_its_dataset(source):
    suite = EvalRunSuite.model_validate(dataset_suite(**SOURCES[source], metadata=["topic"]))
    assert suite.is_inline and suite.cases is None
    with pytest.raises(ValueError, match="reads a dataset"):
        suite.to_suite(LockPolicy.FORBID)
    as_file = suite.to_suite(LockPolicy.FORBID, dataset_path="/mnt/cases.jsonl")
    assert as_file.dataset.path == "/mnt/cases.jsonl"
    assert (as_file.dataset.input, as_file.dataset.expected, as_file.dataset.metadata) == ("question", "answer",
                                                                                           ["topic"])
    assert as_file.cases == []  # read by the runner, from the file


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        ({**INLINE, "dataset": {**DATASET, **SOURCES["imagePath"]}}, "exactly one of `cases` or `dataset`"),
        ({**BY_REF, "dataset": {**DATASET, **SOURCES["imagePath"]}}, "exactly one of `cases` or `dataset`"),
        ({k: v for k, v in dataset_suite(**SOURCES["imagePath"]).items() if k != "target"}, "needs a `target`"),
        (dataset_suite(), "exactly one of `configMapRef`, `persistentVolumeClaim` or `imagePath`"),
        (dataset_suite(**SOURCES["imagePath"], **SOURCES["configMapRef"]), "(got configMapRef, imagePath)"),
        (dataset_suite(imagePath="data/cases.csv"), "should match pattern '^/'"),
        (dataset_suite(persistentVolumeClaim={"claimName": "d", "path": "../etc/passwd"}), "should match pattern"),
        (dataset_suite(persistentVolumeClaim={"claimName": "d", "path": "/abs/cases.csv"}), "should match pattern"),
        (dataset_suite(configMapRef={"name": "qa-data"}), "key\n  Field required"),
        (dataset_suite(**SOURCES["imagePath"], format="xlsx"), "'jsonl', 'csv' or 'parquet'"),
        (dataset_suite(**SOURCES["imagePath"], metadata=["x"] * 65), "at most 64 items"),
    ],
)
def test_invalid_dataset_suites_are_refused(suite, message):
    with pytest.raises(ValidationError) as err:
        EvalRunSpec.model_validate({"suites": [suite]})
    assert message in str(err.value)


def test_the_dataset_schema_carries_the_api_server_s_twin_rules():
    suite = schema()["properties"]["spec"]["properties"]["suites"]["items"]
    dataset = suite["properties"]["dataset"]
    assert set(dataset["properties"]) == {"format", "id", "input", "expected", "metadata", "configMapRef",
                                          "persistentVolumeClaim", "imagePath"}
    [rule] = dataset["x-kubernetes-validations"]
    assert rule["message"] == "a dataset needs exactly one of `configMapRef`, `persistentVolumeClaim` or `imagePath`"
    assert "has(self.persistentVolumeClaim)" in rule["rule"]
    assert dataset["properties"]["configMapRef"]["required"] == ["name", "key"]
    assert "1 MiB" in dataset["properties"]["configMapRef"]["description"]
    messages = [r["message"] for r in suite["x-kubernetes-validations"]]
    assert "a suite needs exactly one of `cases` or `dataset` (an inline suite) or `configMapRef`" in messages


def test_the_example_evalruns_are_valid_and_their_datasets_exist():
    examples = sorted((crd.REPO_ROOT / "examples" / "gitops" / "evalruns").glob("*.yaml"))
    assert len(examples) >= 2
    image_paths = []
    for path in examples:
        manifest = yaml.safe_load(path.read_text())
        parsed = EvalRunSpec.model_validate(manifest["spec"])
        image_paths += [s.dataset.image_path for s in parsed.suites if s.dataset and s.dataset.image_path]
    assert image_paths, "an example EvalRun reads a dataset from the image"
    for image_path in image_paths:  # the image copies examples/suites to /opt/evalrunner/examples/suites
        assert image_path.startswith("/opt/evalrunner/examples/suites/")
        assert (crd.REPO_ROOT / image_path.removeprefix("/opt/evalrunner/")).is_file()


def test_status_dumps_in_camel_case():
    status = EvalRunStatus.model_validate(
        {
            "phase": "Running",
            "observedGeneration": 2,
            "progress": "1/2",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "SuitesRunning",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "suites": [
                {"name": "qa-smoke", "runId": "abc-qa-smoke-a1", "attempt": 1, "phase": "Failed", "cause": "oom_killed"}
            ],
        }
    )
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["observedGeneration"] == 2
    assert dumped["suites"][0]["runId"] == "abc-qa-smoke-a1"
    assert dumped["suites"][0]["cause"] == "oom_killed"
    assert dumped["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    with pytest.raises(ValidationError):
        EvalRunStatus.model_validate({"conditions": [{"type": "Ready", "status": "Maybe", "reason": "X",
                                                      "lastTransitionTime": "2026-01-01T00:00:00Z"}]})


def test_the_chart_ships_the_same_crd():
    assert crd.CHART_CRD_PATH.read_text() == crd.render(), (
        f"charts/evalrunner/crds is out of date; regenerate it with: {crd.REGENERATE}"
    )
