"""The pure builders of an EvalRun's children, from plain dicts (no API server)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from evalrunner.controller import builders as b
from evalrunner.models import EvalRunSpec, LockPolicy
from evalrunner.suites import parse_suite

UID = "0f4c2a9e-1b2c-4d5e-8f90-123456789abc"
STORE = "http://evalrunner-store.evals.svc:8080"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def evalrun(name: str = "nightly", **spec_overrides: Any) -> dict[str, Any]:
    spec = {
        "suites": [
            {
                "name": "qa-smoke",
                "timeoutSeconds": 30,
                "concurrency": 8,
                "target": {"http": {"url": "http://model.default.svc/v1/chat/completions"}},
                "cases": [
                    {"id": "add", "input": "2+2", "expected": "4", "scorer": {"name": "exact"}},
                    {"id": "obj", "input": {"q": [1, None]}, "expected": None, "metadata": {"topic": "json"}},
                    {"id": "mul", "input": "6*7", "expected": 42},
                ],
            },
            {"name": "big", "configMapRef": {"name": "big-suite", "key": "big.yaml"}},
        ],
        "retries": 1,
        **spec_overrides,
    }
    return {
        "apiVersion": "evals.workshop.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": name, "namespace": "evals", "uid": UID, "generation": 1},
        "spec": spec,
    }


def parsed(er: dict[str, Any]) -> EvalRunSpec:
    return EvalRunSpec.model_validate(er["spec"])


def job_for(er: dict[str, Any], suite: str = "qa-smoke", attempt: int = 1, parent: str | None = None, **kw: Any):
    spec = parsed(er)
    return b.build_job(er, spec.suite(suite), attempt, parent, STORE, spec, **kw)


def container(job: dict[str, Any]) -> dict[str, Any]:
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


# ---------------------------------------------------------------- names and ids


def test_names_follow_the_fixed_pattern():
    names = b.object_names("nightly", "qa-smoke", 2)
    assert names == b.Names(configmap="nightly-qa-smoke", job="nightly-qa-smoke-2")


def test_names_are_deterministic_short_and_dns_safe():
    long_run = "a" * 200 + ".b" * 20
    for run, suite, attempt in [("nightly", "qa", 1), (long_run, "s" * 40, 11), ("x" * 60, "y" * 40, 3)]:
        names = b.object_names(run, suite, attempt)
        assert names == b.object_names(run, suite, attempt)
        for name in (names.configmap, names.job):
            assert len(name) <= 63, name
            assert DNS_SUBDOMAIN.match(name), name
            assert LABEL_VALUE.match(name), name


def test_truncated_names_stay_distinct():
    base = "r" * 70
    jobs = {b.object_names(base, "suite", attempt).job for attempt in range(1, 6)}
    assert len(jobs) == 5
    assert b.fit_name(base + "-a") != b.fit_name(base + "-b")
    cut = b.fit_name("x" * 54 + "-" + "y" * 20)
    assert not cut[: -(b.HASH_LEN + 1)].endswith("-")  # no '--' before the hash


def test_run_id_is_a_function_of_uid_suite_and_attempt():
    assert b.run_id_for(UID, "qa-smoke", 1) == "0f4c2a9e1b2c-qa-smoke-a1"
    assert b.run_id_for(UID, "qa-smoke", 1) == b.run_id_for(UID, "qa-smoke", 1)
    assert b.run_id_for(UID, "qa-smoke", 2) != b.run_id_for(UID, "qa-smoke", 1)
    assert b.run_id_for(UID.replace("0f", "1f"), "qa-smoke", 1) != b.run_id_for(UID, "qa-smoke", 1)


# ---------------------------------------------------------------- ConfigMap


def test_inline_suite_configmap_holds_a_loadable_suite_file():
    er = evalrun(concurrencyPolicy="Replace")
    cm = b.build_suite_configmap(er, parsed(er), parsed(er).suite("qa-smoke"))
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "nightly-qa-smoke"
    assert cm["metadata"]["namespace"] == "evals"
    suite = parse_suite(cm["data"][b.SUITE_KEY])
    assert suite == parsed(er).suite("qa-smoke").to_suite(LockPolicy.REPLACE)
    assert [c.id for c in suite.cases] == ["add", "obj", "mul"]
    assert suite.cases[1].input == {"q": [1, None]}
    assert suite.lock_policy is LockPolicy.REPLACE


def test_configmap_ref_suite_gets_no_configmap():
    er = evalrun()
    assert b.build_suite_configmap(er, parsed(er), parsed(er).suite("big")) is None


@pytest.mark.parametrize("kind", ["configmap", "job"])
def test_every_child_is_controlled_by_the_evalrun(kind):
    er = evalrun()
    obj = {
        "configmap": lambda: b.build_suite_configmap(er, parsed(er), parsed(er).suite("qa-smoke")),
        "job": lambda: job_for(er),
    }[kind]()
    assert obj["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "evals.workshop.dev/v1alpha1",
            "kind": "EvalRun",
            "name": "nightly",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert b.owned_by(obj, er)
    other = copy.deepcopy(er)
    other["metadata"]["uid"] = "another-uid"
    assert not b.owned_by(obj, other)


# ---------------------------------------------------------------- the Job


def test_job_labels_annotations_and_names():
    job = job_for(evalrun(), attempt=2, parent="0f4c2a9e1b2c-qa-smoke-a1")
    labels = {
        "app.kubernetes.io/name": "evalrunner",
        "app.kubernetes.io/managed-by": "evalrunner-controller",
        "evals.workshop.dev/evalrun": "nightly",
        "evals.workshop.dev/suite": "qa-smoke",
        "evals.workshop.dev/attempt": "2",
    }
    assert job["metadata"]["name"] == "nightly-qa-smoke-2"
    assert job["metadata"]["labels"] == labels
    assert job["spec"]["template"]["metadata"]["labels"] == labels  # the controller watches pods by these
    annotations = {
        "evals.workshop.dev/run-id": "0f4c2a9e1b2c-qa-smoke-a2",
        "evals.workshop.dev/parent-run-id": "0f4c2a9e1b2c-qa-smoke-a1",
        "evals.workshop.dev/start-timeout-seconds": "120",  # how long Pending may last (never_started)
        "evals.workshop.dev/evalrun-name": "nightly",  # in full (a label value is cut at 63)
    }
    assert job["metadata"]["annotations"] == annotations
    assert job["spec"]["template"]["metadata"]["annotations"] == annotations
    assert b.selector_labels("nightly").items() <= labels.items()


def test_long_evalrun_names_give_valid_labels_and_keep_the_full_name():
    name = "n" * 200
    job = job_for(evalrun(name))
    value = job["metadata"]["labels"][b.LABEL_EVALRUN]
    assert len(value) <= 63 and LABEL_VALUE.match(value)
    assert value == b.selector_labels(name)[b.LABEL_EVALRUN]
    assert job["metadata"]["annotations"][b.ANNOTATION_EVALRUN] == name
    # The pods carry it too: a runner that dies before opening its row is traced to its EvalRun by its pod.
    assert job["spec"]["template"]["metadata"]["annotations"][b.ANNOTATION_EVALRUN] == name


def test_job_never_retries_by_itself_and_never_restarts():
    job = job_for(evalrun())
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_first_attempt_command():
    assert container(job_for(evalrun()))["command"] == [
        "evalrunner", "run-suite", "/etc/evalrunner/suite/suite.yaml",
        "--store-url", STORE,
        "--run-id", "0f4c2a9e1b2c-qa-smoke-a1",
        "--deadline-grace", "60",
    ]  # fmt: skip


def test_retry_resumes_from_its_parent():
    command = container(job_for(evalrun(), attempt=2, parent="0f4c2a9e1b2c-qa-smoke-a1"))["command"]
    assert command[-2:] == ["--resume", "0f4c2a9e1b2c-qa-smoke-a1"]
    assert command[command.index("--run-id") + 1] == "0f4c2a9e1b2c-qa-smoke-a2"


def test_the_store_token_is_the_pods_own_projected_token_for_the_stores_audience():
    job = job_for(evalrun(), token_audience="evalrunner-store.ops.er")
    pod = job["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == b.TOKEN_VOLUME)
    assert volume["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "evalrunner-store.ops.er", "expirationSeconds": b.TOKEN_EXPIRATION_S, "path": b.TOKEN_FILE}}]
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == b.TOKEN_VOLUME)
    assert mount == {"name": b.TOKEN_VOLUME, "mountPath": b.TOKEN_MOUNT_PATH, "readOnly": True}
    assert env(job)["EVALRUNNER_STORE_TOKEN_FILE"] == f"{b.TOKEN_MOUNT_PATH}/{b.TOKEN_FILE}"
    assert "EVALRUNNER_STORE_TOKEN" not in env(job)
    assert pod["automountServiceAccountToken"] is False, "the API server's own token stays out of the pod"


def test_env_downward_api_and_log_format():
    values = env(job_for(evalrun()))
    assert values["EVALRUNNER_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert values["EVALRUNNER_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert values["EVALRUNNER_POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert values["EVALRUNNER_LOG_FORMAT"] == "json"
    assert values["TMPDIR"] == b.SCRATCH_PATH


def test_deadline_is_the_run_deadline_plus_grace():
    # 3 cases x 30 s + 60 s grace
    assert job_for(evalrun())["spec"]["activeDeadlineSeconds"] == 150
    assert job_for(evalrun(deadlineGraceSeconds=0))["spec"]["activeDeadlineSeconds"] == 90
    er = evalrun()
    er["spec"]["suites"][0]["timeoutSeconds"] = 0.4
    assert job_for(er)["spec"]["activeDeadlineSeconds"] == 62  # ceil(1.2 + 60)
    del er["spec"]["suites"][0]["timeoutSeconds"]
    assert job_for(er)["spec"]["activeDeadlineSeconds"] == 3 * 30 + 60  # the suite default, 30 s
    assert b.active_deadline_seconds(2.5, 3, 0.1) == 8


def test_configmap_ref_deadline_needs_the_file_s_size_and_timeout():
    er = evalrun()
    assert "activeDeadlineSeconds" not in job_for(er, "big")["spec"]
    assert "activeDeadlineSeconds" not in job_for(er, "big", case_count=100)["spec"]
    job = job_for(er, "big", case_count=100, case_timeout_seconds=10)
    assert job["spec"]["activeDeadlineSeconds"] == 100 * 10 + 60


def test_configmap_ref_suite_mounts_the_referenced_configmap():
    job = job_for(evalrun(), "big")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    # Every key, so the suite file may name a dataset kept beside it (`dataset: {path: cases.jsonl}`).
    assert volumes["suite"]["configMap"] == {"name": "big-suite"}
    assert container(job)["command"][2] == "/etc/evalrunner/suite/big.yaml"
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert mounts["suite"] == {"name": "suite", "mountPath": "/etc/evalrunner/suite", "readOnly": True}


def test_inline_suite_mounts_its_own_configmap():
    job = job_for(evalrun())
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["suite"]["configMap"]["name"] == "nightly-qa-smoke"
    assert container(job)["command"][2] == "/etc/evalrunner/suite/suite.yaml"
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}


def test_resources_pass_through():
    job = job_for(evalrun(resources={"limits": {"memory": "512Mi", "cpu": 1}, "requests": {"cpu": "250m"}}))
    assert container(job)["resources"] == {"requests": {"cpu": "250m"}, "limits": {"cpu": "1", "memory": "512Mi"}}
    assert "resources" not in container(job_for(evalrun()))


def test_without_an_image_the_runner_uses_the_controllers_own():
    """`spec.image` is optional: an EvalRun runs in whatever image the controller was installed with."""
    er = evalrun()
    assert parsed(er).image is None
    assert container(job_for(er, default_image="registry.example.com/evalrunner:0.3.1"))["image"] == \
        "registry.example.com/evalrunner:0.3.1"
    pinned = evalrun(image="registry.example/evalrunner:0.2.0")
    assert container(job_for(pinned, default_image="registry.example.com/evalrunner:0.3.1"))["image"] == \
        "registry.example/evalrunner:0.2.0", "an EvalRun that names its image keeps it"


def test_image_termination_message_and_security_context():
    job = job_for(evalrun(image="registry.example/evalrunner:0.2.0"))
    c = container(job)
    pod = job["spec"]["template"]["spec"]
    assert c["name"] == "runner"
    assert c["image"] == "registry.example/evalrunner:0.2.0"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod


def test_service_account_and_ttl_when_given():
    job = job_for(evalrun(serviceAccountName="eval-runner", ttlSecondsAfterFinished=600))
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "eval-runner"
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert "ttlSecondsAfterFinished" not in job_for(evalrun())["spec"]


def test_builders_do_not_touch_their_input():
    er = evalrun()
    before = copy.deepcopy(er)
    job_for(er, attempt=3, parent="p")
    b.build_suite_configmap(er, parsed(er), parsed(er).suite("qa-smoke"))
    assert er == before


# ---------------------------------------------------------------- dataset suites


def dataset_evalrun(dataset: dict[str, Any], **suite: Any) -> dict[str, Any]:
    er = evalrun()
    er["spec"]["suites"] = [{"name": "qa", "timeoutSeconds": 10, "target": {"python": {"callable": "m:f"}},
                             "dataset": {"input": "question", "expected": "answer", **dataset}, **suite}]
    return er


def suite_file_of(er: dict[str, Any]) -> dict[str, Any]:
    spec = parsed(er)
    return yaml.safe_load(b.build_suite_configmap(er, spec, spec.suite("qa"))["data"][b.SUITE_KEY])


def volumes_and_mounts(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    return volumes, {m["name"]: m for m in container(job)["volumeMounts"]}


def test_a_configmap_dataset_is_mounted_read_only_and_named_in_the_suite_file():
    er = dataset_evalrun({"configMapRef": {"name": "qa-data", "key": "cases.jsonl"}, "metadata": ["topic"]})
    assert suite_file_of(er)["dataset"] == {"path": "/etc/evalrunner/dataset/cases.jsonl", "input": "question",
                                            "expected": "answer", "metadata": ["topic"]}
    volumes, mounts = volumes_and_mounts(job_for(er, "qa"))
    assert volumes["dataset"] == {"name": "dataset",
                                  "configMap": {"name": "qa-data", "items": [{"key": "cases.jsonl", "path": "cases.jsonl"}]}}
    assert mounts["dataset"] == {"name": "dataset", "mountPath": "/etc/evalrunner/dataset", "readOnly": True}
    assert volumes["suite"]["configMap"]["name"] == "nightly-qa"  # the runner reads its suite file as always
    assert container(job_for(er, "qa"))["command"][2] == "/etc/evalrunner/suite/suite.yaml"


def test_a_claim_dataset_mounts_the_claim_read_only():
    er = dataset_evalrun({"persistentVolumeClaim": {"claimName": "datasets", "path": "qa/cases.parquet"}})
    assert suite_file_of(er)["dataset"]["path"] == "/etc/evalrunner/dataset/qa/cases.parquet"
    volumes, mounts = volumes_and_mounts(job_for(er, "qa"))
    assert volumes["dataset"] == {"name": "dataset", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}
    assert mounts["dataset"]["readOnly"] is True


def test_an_image_dataset_needs_no_mount():
    er = dataset_evalrun({"imagePath": "/opt/evalrunner/examples/suites/arithmetic.jsonl", "format": "jsonl"})
    assert suite_file_of(er)["dataset"] == {"format": "jsonl", "input": "question", "expected": "answer",
                                            "path": "/opt/evalrunner/examples/suites/arithmetic.jsonl"}
    volumes, mounts = volumes_and_mounts(job_for(er, "qa"))
    assert set(volumes) == set(mounts) == {"suite", "scratch", b.TOKEN_VOLUME}


def test_a_dataset_suite_s_deadline_waits_for_its_size():
    er = dataset_evalrun({"imagePath": "/data/cases.jsonl"})
    assert "activeDeadlineSeconds" not in job_for(er, "qa")["spec"]  # the store's row deadline bounds it
    assert job_for(er, "qa", case_count=100, case_timeout_seconds=10)["spec"]["activeDeadlineSeconds"] == 1060


def test_a_dataset_suite_file_loads_where_the_pod_finds_the_file(tmp_path):
    (tmp_path / "cases.jsonl").write_text('{"id": "a", "question": "2+2", "answer": "4"}\n')
    er = dataset_evalrun({"imagePath": str(tmp_path / "cases.jsonl")})
    spec = parsed(er)
    suite = parse_suite(b.build_suite_configmap(er, spec, spec.suite("qa"))["data"][b.SUITE_KEY])
    assert [(c.id, c.input, c.expected) for c in suite.cases] == [("a", "2+2", "4")]


def test_an_inline_suite_over_the_configmap_limit_is_refused_naming_the_alternatives():
    er = evalrun()
    big = "x" * (b.CONFIGMAP_MAX_BYTES // 4)
    er["spec"]["suites"][0]["cases"] = [{"id": f"c{i}", "input": big} for i in range(4)]
    spec = parsed(er)
    with pytest.raises(b.SuiteTooLarge) as info:
        b.build_suite_configmap(er, spec, spec.suite("qa-smoke"))
    message = str(info.value)
    assert message.startswith("suite qa-smoke: its suite file is 1,048,")
    assert "1 MiB a ConfigMap holds" in message
    assert "dataset.persistentVolumeClaim" in message and "dataset.imagePath" in message
    # just under the limit is fine: the API server counts the values' bytes
    er["spec"]["suites"][0]["cases"] = [{"id": "c0", "input": "x" * (b.CONFIGMAP_MAX_BYTES - 4096)}]
    spec = parsed(er)
    cm = b.build_suite_configmap(er, spec, spec.suite("qa-smoke"))
    assert len(cm["data"][b.SUITE_KEY].encode()) <= b.CONFIGMAP_MAX_BYTES
