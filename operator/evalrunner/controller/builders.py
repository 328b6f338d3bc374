"""Pure builders of an EvalRun's child objects: suite ConfigMap and Job.

Each function takes plain dicts (the EvalRun as the API server returns it)
and models, and returns a plain manifest; none calls the API. Names are fixed
and deterministic, so a handler that runs twice (kopf re-lists on restart and
on 410 Gone) gets 409 Conflict instead of a duplicate, and a run id is a
function of (EvalRun uid, suite, attempt), so a re-created pod resumes the
same row rather than opening a second one.

Two EvalRuns can still produce the same fixed name ("a-b" + suite "c" and
"a" + suite "b-c" both give ConfigMap "a-b-c"): on 409 the handler checks
`owned_by()` before treating the existing object as its own.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import yaml

from .. import __version__
from ..crd import API_VERSION, KIND
from ..models import EvalRunSpec, EvalRunSuite, Suite

MAX_NAME = 63  # a Job name is also a pod label value
HASH_LEN = 8

LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_EVALRUN = "evals.workshop.dev/evalrun"
LABEL_SUITE = "evals.workshop.dev/suite"
LABEL_ATTEMPT = "evals.workshop.dev/attempt"
ANNOTATION_RUN_ID = "evals.workshop.dev/run-id"
ANNOTATION_PARENT_RUN_ID = "evals.workshop.dev/parent-run-id"
ANNOTATION_START_TIMEOUT = "evals.workshop.dev/start-timeout-seconds"  # for never_started
ANNOTATION_EVALRUN = "evals.workshop.dev/evalrun-name"  # in full: the label value is cut at 63 characters
APP = "evalrunner"
MANAGER = "evalrunner-controller"

CONTAINER_NAME = "runner"
SUITE_VOLUME = "suite"
SUITE_MOUNT_PATH = "/etc/evalrunner/suite"
SUITE_KEY = "suite.yaml"
DATASET_VOLUME = "dataset"
DATASET_MOUNT_PATH = "/etc/evalrunner/dataset"  # a ConfigMap's key, or the root of a claim
# The runner's store credential: a service-account token the kubelet requests bound to the pod, for
# the store's audience alone, and rotates (at 80% of its life). It ends with the pod (pod_tokens.py).
TOKEN_VOLUME = "store-token"
TOKEN_MOUNT_PATH = "/var/run/secrets/evalrunner"
TOKEN_FILE = "token"
DEFAULT_TOKEN_AUDIENCE = "evalrunner-store"
TOKEN_EXPIRATION_S = 3600
# The API server refuses a ConfigMap whose values add up to more than 1 MiB.
CONFIGMAP_MAX_BYTES = 1024 * 1024
# readOnlyRootFilesystem leaves the runner no writable place; give it a scratch
# directory (not /tmp itself, which the test node agent keeps its state under).
SCRATCH_VOLUME = "scratch"
SCRATCH_PATH = "/var/tmp/evalrunner"
TERMINATION_LOG = "/dev/termination-log"
DEFAULT_RUNNER_IMAGE = f"evalrunner:{__version__}"  # the controller passes its own (--runner-image)
RUNNER_UID = 65532  # "nonroot" in distroless images


class SuiteTooLarge(ValueError):
    """An inline suite whose file would not fit in its ConfigMap: the API server would refuse it."""


@dataclass(frozen=True)
class DatasetMount:
    """Where a dataset suite's file is in its runner pod, and the read-only volume that puts it there (if any)."""

    path: str
    volume: dict[str, Any] | None  # None: the file is in the image


@dataclass(frozen=True)
class Names:
    """The fixed names of one suite attempt's objects."""

    configmap: str  # {evalrun}-{suite}: the inline suite's file
    job: str  # {evalrun}-{suite}-{attempt}


def fit_name(*parts: str | int, limit: int = MAX_NAME) -> str:
    """`parts` joined by '-'; if longer than `limit`, cut and suffixed with a hash of the whole.

    The result stays a DNS label/subdomain and a valid label value: the cut
    drops trailing '-' and '.', and the hash keeps two long names that share
    a prefix apart.
    """
    full = "-".join(str(p) for p in parts)
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:HASH_LEN]
    head = full[: limit - HASH_LEN - 1].rstrip("-.")
    return f"{head}-{digest}"


def suite_configmap_name(evalrun_name: str, suite_name: str) -> str:
    return fit_name(evalrun_name, suite_name)


def job_name(evalrun_name: str, suite_name: str, attempt: int) -> str:
    return fit_name(evalrun_name, suite_name, attempt)


def object_names(evalrun_name: str, suite_name: str, attempt: int) -> Names:
    return Names(
        configmap=suite_configmap_name(evalrun_name, suite_name),
        job=job_name(evalrun_name, suite_name, attempt),
    )


def run_id_for(evalrun_uid: str, suite: str, attempt: int) -> str:
    """The store run id of one suite attempt: the same on every retry of the handler."""
    return f"{evalrun_uid.replace('-', '')[:12]}-{suite}-a{attempt}"


def selector_labels(evalrun_name: str) -> dict[str, str]:
    """Labels that select every object (and pod) of one EvalRun."""
    return {LABEL_MANAGED_BY: MANAGER, LABEL_EVALRUN: fit_name(evalrun_name)}


def object_labels(evalrun_name: str, suite_name: str | None = None, attempt: int | None = None) -> dict[str, str]:
    labels = {LABEL_APP: APP, **selector_labels(evalrun_name)}
    if suite_name is not None:
        labels[LABEL_SUITE] = suite_name
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    return labels


def owner_reference(evalrun: dict[str, Any]) -> dict[str, Any]:
    """Makes the EvalRun the controller of a child, so deleting it garbage-collects the child."""
    meta = evalrun["metadata"]
    return {
        "apiVersion": evalrun.get("apiVersion", API_VERSION),
        "kind": evalrun.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any], evalrun: dict[str, Any]) -> bool:
    """Whether `obj` (e.g. the one behind a 409 Conflict) belongs to this EvalRun."""
    uid = evalrun["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def active_deadline_seconds(case_timeout_s: float, case_count: int, grace_s: float) -> int:
    """The Job's deadline: the run's own (`timeout_seconds * len(cases)`) plus grace, rounded up."""
    return max(1, math.ceil(case_timeout_s * case_count + grace_s))


def suite_file_text(suite: Suite) -> str:
    """The suite as a suite file (snake_case, defaults left out), as `evalrunner run` reads it.

    A dataset suite's file names its dataset, never the rows read from it.
    """
    data = suite.model_dump(mode="json", exclude_defaults=True, exclude={"cases"} if suite.dataset else None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _metadata(evalrun: dict[str, Any], name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta = evalrun["metadata"]
    out: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(evalrun)],
        "annotations": {ANNOTATION_EVALRUN: meta["name"]},
    }
    return out


def dataset_mount(suite: EvalRunSuite) -> DatasetMount | None:
    """Where the runner pod reads an inline suite's dataset; None for a suite without one."""
    dataset = suite.dataset
    if dataset is None:
        return None
    if dataset.config_map_ref is not None:
        ref = dataset.config_map_ref
        volume = {"name": DATASET_VOLUME, "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": ref.key}]}}
        return DatasetMount(f"{DATASET_MOUNT_PATH}/{ref.key}", volume)
    if dataset.persistent_volume_claim is not None:
        claim = dataset.persistent_volume_claim
        volume = {"name": DATASET_VOLUME, "persistentVolumeClaim": {"claimName": claim.claim_name, "readOnly": True}}
        return DatasetMount(f"{DATASET_MOUNT_PATH}/{claim.path}", volume)
    return DatasetMount(str(dataset.image_path), None)


def build_suite_configmap(evalrun: dict[str, Any], spec: EvalRunSpec, suite: EvalRunSuite) -> dict[str, Any] | None:
    """The ConfigMap holding an inline suite's file; None for a configMapRef suite (its Job mounts that one).

    The file names the suite's concurrencyPolicy so that its runs record it; the controller alone applies it.
    A dataset suite's file names its dataset where the Job mounts it. Raises SuiteTooLarge for a file over
    the ConfigMap limit, which the API server would refuse.
    """
    if not suite.is_inline:
        return None
    name = evalrun["metadata"]["name"]
    mount = dataset_mount(suite)
    text = suite_file_text(suite.to_suite(spec.policy_for(suite), dataset_path=mount.path if mount else None))
    size = len(text.encode())
    if size > CONFIGMAP_MAX_BYTES:
        raise SuiteTooLarge(
            f"suite {suite.name}: its suite file is {size:,} bytes, more than the 1 MiB a ConfigMap holds; keep the "
            f"cases in a dataset on a PersistentVolumeClaim (dataset.persistentVolumeClaim) or in the runner image "
            f"(dataset.imagePath)"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(evalrun, suite_configmap_name(name, suite.name), object_labels(name, suite.name)),
        "data": {SUITE_KEY: text},
    }


def _suite_source(evalrun: dict[str, Any], suite: EvalRunSuite) -> tuple[str, str]:
    """(ConfigMap name, key) of the suite file a Job mounts."""
    if suite.config_map_ref is not None:
        return suite.config_map_ref.name, suite.config_map_ref.key
    return suite_configmap_name(evalrun["metadata"]["name"], suite.name), SUITE_KEY


def _suite_volume_source(suite: EvalRunSuite, configmap: str, key: str) -> dict[str, Any]:
    """An inline suite's own ConfigMap, or the whole referenced one (its other keys may hold the suite's dataset)."""
    if suite.config_map_ref is not None:
        return {"name": configmap}
    return {"name": configmap, "items": [{"key": key, "path": key}]}


def _deadline(
    suite: EvalRunSuite, spec: EvalRunSpec, case_count: int | None, case_timeout_seconds: float | None
) -> int | None:
    """activeDeadlineSeconds, or None when the size or timeout of a configMapRef or dataset suite is not known."""
    if suite.cases is not None:
        count = case_count if case_count is not None else len(suite.cases)
        timeout = suite.timeout_seconds or Suite.model_fields["timeout_seconds"].default
    else:
        if case_count is None or case_timeout_seconds is None:
            return None
        count, timeout = case_count, case_timeout_seconds
    return active_deadline_seconds(timeout, count, spec.deadline_grace_seconds)


def runner_command(
    suite_path: str, store_url: str, run_id: str, attempt: int, parent_run_id: str | None, grace_s: float
) -> list[str]:
    command = [
        "evalrunner", "run-suite", suite_path,
        "--store-url", store_url,
        "--run-id", run_id,
        "--deadline-grace", str(grace_s),
    ]  # fmt: skip
    if parent_run_id:
        command += ["--resume", parent_run_id]
    return command


def _user_env(spec: EvalRunSpec) -> list[dict[str, Any]]:
    """spec.env first, so the runner's own variables (listed after) win on a name clash."""
    return [var.model_dump(by_alias=True, exclude_none=True) for var in spec.env]


def _runner_env() -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    return [
        {"name": "EVALRUNNER_STORE_TOKEN_FILE", "value": f"{TOKEN_MOUNT_PATH}/{TOKEN_FILE}"},
        {"name": "EVALRUNNER_POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "EVALRUNNER_POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "EVALRUNNER_POD_UID", "valueFrom": field("metadata.uid")},
        {"name": "EVALRUNNER_LOG_FORMAT", "value": "json"},
        {"name": "TMPDIR", "value": SCRATCH_PATH},
    ]


def store_token_volume(audience: str) -> dict[str, Any]:
    """The pod's store credential, projected by the kubelet (no Secret, nothing to revoke: it ends with the pod)."""
    token = {"audience": audience, "expirationSeconds": TOKEN_EXPIRATION_S, "path": TOKEN_FILE}
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}}


POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUNNER_UID,
    "runAsGroup": RUNNER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUNNER_UID,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_job(
    evalrun: dict[str, Any],
    suite: EvalRunSuite,
    attempt: int,
    parent_run_id: str | None,
    store_url: str,
    spec: EvalRunSpec,
    *,
    case_count: int | None = None,
    case_timeout_seconds: float | None = None,
    default_image: str = DEFAULT_RUNNER_IMAGE,
    token_audience: str = DEFAULT_TOKEN_AUDIENCE,
) -> dict[str, Any]:
    """The Job of one suite attempt, in the EvalRun's image or else `default_image` (the controller's own).

    `backoffLimit: 0`: the controller makes each retry a new Job (a new
    attempt, a new row that resumes from `parent_run_id`), so it records why
    every pod died. For a configMapRef or dataset suite pass `case_count`
    and `case_timeout_seconds` from its file; without them the Job gets no
    `activeDeadlineSeconds` and the store's row deadline (the sweeper)
    bounds the run alone. A configMapRef suite's Job mounts the whole
    ConfigMap, so its suite file may name a dataset kept under another key
    (`dataset: {path: cases.jsonl}`); a dataset suite's Job mounts its
    dataset read-only.
    """
    meta = evalrun["metadata"]
    names = object_names(meta["name"], suite.name, attempt)
    run_id = run_id_for(meta["uid"], suite.name, attempt)
    labels = object_labels(meta["name"], suite.name, attempt)
    # On the Job and on its pods: a pod alone must name its run and its EvalRun (children.RunnerPod).
    annotations = {ANNOTATION_RUN_ID: run_id, ANNOTATION_START_TIMEOUT: str(spec.start_timeout_seconds),
                   ANNOTATION_EVALRUN: meta["name"]}
    if parent_run_id:
        annotations[ANNOTATION_PARENT_RUN_ID] = parent_run_id
    configmap, key = _suite_source(evalrun, suite)
    dataset = dataset_mount(suite)

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or default_image,
        "command": runner_command(
            f"{SUITE_MOUNT_PATH}/{key}", store_url, run_id, attempt, parent_run_id, spec.deadline_grace_seconds
        ),
        "env": _user_env(spec) + _runner_env(),
        "volumeMounts": [
            {"name": SUITE_VOLUME, "mountPath": SUITE_MOUNT_PATH, "readOnly": True},
            {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True},
        ],
        # The runner writes its RunSummary here; the controller completes a row
        # from it when the runner's final write to the store failed.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if spec.resources is not None and (requirements := spec.resources.as_requirements()):
        container["resources"] = requirements

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": [
            {"name": SUITE_VOLUME, "configMap": _suite_volume_source(suite, configmap, key)},
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
            store_token_volume(token_audience),
        ],
    }
    if dataset is not None and dataset.volume is not None:
        pod_spec["volumes"].append(dataset.volume)
        container["volumeMounts"].append({"name": DATASET_VOLUME, "mountPath": DATASET_MOUNT_PATH, "readOnly": True})
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name

    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
    }
    deadline = _deadline(suite, spec, case_count, case_timeout_seconds)
    if deadline is not None:
        job_spec["activeDeadlineSeconds"] = deadline
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished

    job_meta = _metadata(evalrun, names.job, labels)
    job_meta["annotations"] = {**job_meta.get("annotations", {}), **annotations}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}
