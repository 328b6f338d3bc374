"""The generated EvalRun CRD as the real API server enforces it.

Each invalid manifest is refused with HTTP 422 and a message that names the
field and says what is wrong; nothing is stored. The status subresource
keeps what the controller writes (no pruning).
"""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes.client.rest import ApiException

from operator_support import GROUP, PLURAL, VERSION, evalrun_manifest, smoke_suite

pytestmark = pytest.mark.cluster


def valid() -> dict:
    return evalrun_manifest("valid", [smoke_suite("smoke")])


def with_suite(**changes) -> dict:
    body = valid()
    suite = body["spec"]["suites"][0]
    for key, value in changes.items():
        if value is None:
            suite.pop(key, None)
        else:
            suite[key] = value
    return body


def with_spec(**changes) -> dict:
    body = valid()
    body["spec"].update(changes)
    return body


def dataset_suite(**source) -> dict:
    suite = {k: v for k, v in smoke_suite("data").items() if k != "cases"}
    return suite | {"dataset": {"input": "question", "expected": "answer", **source}}


def with_dataset(**source) -> dict:
    return evalrun_manifest("valid", [dataset_suite(**source)])


IMAGE_FILE = {"imagePath": "/opt/evalrunner/examples/suites/arithmetic.jsonl"}
two_suites_same_name = valid()
two_suites_same_name["spec"]["suites"].append(copy.deepcopy(two_suites_same_name["spec"]["suites"][0]))
duplicate_case_ids = with_suite(cases=[{"id": "a", "input": "1", "expected": "1"}, {"id": "a", "input": "2", "expected": "2"}])

INVALID = [
    # (what is wrong, manifest, words the API server's message must contain)
    ("two targets", with_suite(target={"python": {"callable": "m:f"}, "command": {"argv": ["x"]}}), ["exactly one"]),
    ("no target", with_suite(target=None), ["target"]),
    ("cases and configMapRef", with_suite(configMapRef={"name": "cm"}), ["exactly one of `cases`"]),
    ("neither cases nor configMapRef", with_suite(cases=None), ["exactly one of `cases`"]),
    ("negative timeout", with_suite(timeoutSeconds=-1), ["timeoutSeconds", "greater than 0"]),
    ("zero concurrency", with_suite(concurrency=0), ["concurrency", "greater than or equal to 1"]),
    ("unknown scorer", with_suite(scorer={"name": "fuzzy"}), ["scorer.name", "Unsupported value"]),
    ("another scorer's option", with_suite(scorer={"name": "exact", "tolerance": 1}),
     ["tolerance", "numeric scorer only"]),
    ("strip on contains", with_suite(scorer={"name": "contains", "strip": True}), ["strip", "exact scorer only"]),
    ("bad suite name", with_suite(name="Bad_Name"), ["name", "should match"]),
    ("duplicate suite names", two_suites_same_name, ["Duplicate value"]),
    ("duplicate case ids", duplicate_case_ids, ["Duplicate value"]),
    ("too many retries", with_spec(retries=11), ["retries", "less than or equal to 10"]),
    ("unknown concurrency policy", with_spec(concurrencyPolicy="Sometimes"), ["concurrencyPolicy", "Unsupported value"]),
    ("bad memory quantity", with_spec(resources={"limits": {"memory": "lots"}}), ["memory"]),
    ("no suites", with_spec(suites=[]), ["suites", "at least 1"]),
    ("unknown field", with_spec(retrys=1), ["unknown field", "retrys"]),
    ("cases and dataset", with_suite(dataset={"input": "q", **IMAGE_FILE}), ["exactly one of `cases` or `dataset`"]),
    ("dataset without a source", with_dataset(), ["exactly one of `configMapRef`, `persistentVolumeClaim`"]),
    ("dataset with two sources", with_dataset(**IMAGE_FILE, configMapRef={"name": "cm", "key": "c.jsonl"}),
     ["exactly one of `configMapRef`, `persistentVolumeClaim`"]),
    ("claim path leaving the claim", with_dataset(persistentVolumeClaim={"claimName": "d", "path": "a/../../etc"}),
     ["persistentVolumeClaim.path", "should match"]),
    ("relative image path", with_dataset(imagePath="data/cases.jsonl"), ["imagePath", "should match"]),
    ("unknown dataset format", with_dataset(**IMAGE_FILE, format="xlsx"), ["format", "Unsupported value"]),
]


@pytest.mark.parametrize("what,manifest,words", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_evalrun_is_refused_with_a_message_that_says_what_is_wrong(evalruns, what, manifest, words):
    with pytest.raises(ApiException) as exc:
        evalruns.custom.create_namespaced_custom_object(GROUP, VERSION, evalruns.namespace, PLURAL, manifest,
                                                        field_validation="Strict")
    assert exc.value.status in (400, 422), exc.value.body
    message = json.loads(exc.value.body)["message"]
    for word in words:
        assert word in message, f"{what}: {message}"
    listed = evalruns.custom.list_namespaced_custom_object(GROUP, VERSION, evalruns.namespace, PLURAL)["items"]
    assert listed == []  # nothing stored


def test_valid_evalrun_is_accepted_and_its_status_is_kept(evalruns):
    created = evalruns.create(valid())
    assert created["spec"]["suites"][0]["name"] == "smoke"
    status = {"phase": "Running", "observedGeneration": 1, "progress": "0/1", "passed": 0, "failed": 0, "errored": 0,
              "suites": [{"name": "smoke", "runId": "abc-smoke-a1", "attempt": 1, "phase": "Running",
                          "passed": 0, "failed": 0, "errored": 0}]}
    evalruns.custom.patch_namespaced_custom_object_status(GROUP, VERSION, evalruns.namespace, PLURAL, "valid",
                                                          {"status": status})
    kept = evalruns.status("valid")
    assert kept["suites"][0]["runId"] == "abc-smoke-a1" and kept["progress"] == "0/1"


@pytest.mark.parametrize("source", [IMAGE_FILE, {"configMapRef": {"name": "qa-data", "key": "cases.jsonl"}},
                                    {"persistentVolumeClaim": {"claimName": "datasets", "path": "qa/cases.parquet"}}],
                         ids=["image", "configmap", "claim"])
def test_a_dataset_suite_is_accepted_as_written(evalruns, source):
    created = evalruns.create(with_dataset(**source, metadata=["topic"]))
    assert created["spec"]["suites"][0]["dataset"] == {"input": "question", "expected": "answer",
                                                       "metadata": ["topic"], **source}


def test_the_configmap_limit_is_what_the_builders_assume(evalruns):
    """1 MiB of values is accepted, one byte more refused: where the controller refuses an inline suite."""
    from evalrunner.controller.builders import CONFIGMAP_MAX_BYTES

    core = evalruns.core
    body = {"metadata": {"name": "fits"}, "data": {"suite.yaml": "x" * CONFIGMAP_MAX_BYTES}}
    core.create_namespaced_config_map(evalruns.namespace, body)
    body = {"metadata": {"name": "too-big"}, "data": {"suite.yaml": "x" * (CONFIGMAP_MAX_BYTES + 1)}}
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_config_map(evalruns.namespace, body)
    assert exc.value.status == 422 and "Too long" in json.loads(exc.value.body)["message"]
