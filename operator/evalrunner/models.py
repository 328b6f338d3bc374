"""The data the product speaks in: suites, cases, targets, scorers, run states.

These frozen pydantic models are the single source of truth for the suite
file format and the EvalRun CRD schema (`evalrunner.crd` generates it). Field
names are snake_case in Python and in suite files; camelCase aliases
(`timeoutSeconds`) are accepted too, because the same suite is embedded in
Kubernetes manifests.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .timing import DEADLINE_GRACE_S, START_TIMEOUT_S

# A case id or suite name becomes part of row ids, log lines and Kubernetes
# object names, so keep it to a safe, readable alphabet.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


# Numbers and flags a user writes are `strict=True` fields: pydantic would otherwise take `true` as 1
# (`timeout_seconds: true` meant one second) and "5" as 5. A whole number still fills a float field.


class Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


class RunStatus(str, enum.Enum):
    """Lifecycle of an `eval_runs` or `eval_cases` row. Only `running` is not terminal."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Cause(str, enum.Enum):
    """Why a row is `failed`: a closed set, so no failure is "because of None"."""

    CASE_RAISED = "case_raised"
    CASE_SAVE_FAILED = "case_save_failed"
    CASE_TIMEOUT = "case_timeout"
    STATUS_WRITE_FAILED = "status_write_failed"
    OOM_KILLED = "oom_killed"
    KILLED = "killed"
    ERROR_EXIT = "error"
    CONTAINER_RESTARTED = "container_restarted"
    EVICTED = "evicted"
    NODE_LOST = "node_lost"
    POD_DELETED = "pod_deleted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTDOWN_REQUESTED = "shutdown_requested"
    HEARTBEAT_LOST = "heartbeat_lost"
    NEVER_STARTED = "never_started"
    REPLACED = "replaced"
    RUNNER_ERROR = "runner_error"
    MANUAL = "manual"


class LockPolicy(str, enum.Enum):
    """What a new run of a suite does while another run of it is live."""

    ALLOW = "Allow"  # run side by side
    FORBID = "Forbid"  # refuse the new run
    REPLACE = "Replace"  # terminate the live run, then start


# ---------------------------------------------------------------- targets


class PythonTarget(Frozen):
    """Call `module:function(input)`; sync functions run in a worker thread."""

    callable: str = Field(pattern=CALLABLE_PATTERN, description="Import path, `module:function`.")


DEFAULT_HTTP_RETRIES = 3
MAX_HTTP_RETRIES = 10


class HttpTarget(Frozen):
    """POST the case input to an HTTP JSON endpoint."""

    url: str = Field(pattern=r"^https?://", description="Endpoint URL (http or https).")
    format: Literal["openai-chat", "json"] = Field(
        default="openai-chat",
        description="`openai-chat`: an OpenAI-compatible chat-completions call; "
        "`json`: POST {\"input\": ...} and read `output_field` of the reply.",
    )
    model: str | None = Field(default=None, description="Model name sent in openai-chat requests.")
    system_prompt: str | None = Field(default=None, description="System message prepended in openai-chat requests.")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the bearer token; never the key itself.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP request headers.")
    output_field: str = Field(default="output", description="Reply field read by the `json` format.")
    usage_field: str = Field(
        default="usage",
        description="Reply field holding token usage (`prompt_tokens`, `completion_tokens`, `total_tokens`), "
        "in both formats. Default: usage, as in OpenAI's replies.",
    )
    max_retries: int = Field(
        strict=True,
        default=DEFAULT_HTTP_RETRIES,
        ge=0,
        le=MAX_HTTP_RETRIES,
        description="Retries of a call answered with HTTP 408, 429 or 5xx or cut off by a connection error, after "
        "exponential backoff with jitter or the reply's Retry-After, within the case's timeout. Default: 3.",
    )
    requests_per_minute: int | None = Field(
        strict=True,
        default=None, ge=1, description="At most this many requests per minute over all cases of a run (retries "
        "included). Default: no limit.",
    )
    tokens_per_minute: int | None = Field(
        strict=True,
        default=None, ge=1, description="At most this many tokens per minute over all cases of a run, as the "
        "replies' usage counts them (estimated before each call, settled after). Default: no limit.",
    )

    def __hash__(self) -> int:  # `headers` is a dict; a judge's Scorer, which holds this, is a dict key
        return hash(self.model_dump_json())


class CommandTarget(Frozen):
    """Run a command per case: input on stdin, output read from stdout."""

    argv: list[str] = Field(min_length=1, description="Program and arguments (no shell).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the command.")


class Target(Frozen):
    """What each case is run against: exactly one of `python`, `http` or `command`."""

    # The API server's twin of `_exactly_one`, for the EvalRun CRD.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.python) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.command) ? 1 : 0) == 1",
                    "message": "a target needs exactly one of `python`, `http` or `command`",
                }
            ]
        }
    )

    python: PythonTarget | None = Field(default=None, description="Call a Python function in the runner.")
    http: HttpTarget | None = Field(default=None, description="POST to an HTTP endpoint.")
    command: CommandTarget | None = Field(default=None, description="Run a command per case.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        chosen = [k for k in ("python", "http", "command") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "a target needs exactly one of `python`, `http` or `command`"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("python", "http", "command") if getattr(self, k) is not None)


# ---------------------------------------------------------------- scorers

ScorerName = Literal["exact", "contains", "regex", "json_equal", "numeric", "custom", "judge"]
# The options each scorer reads. Any other one is refused: `tolerance` on an exact scorer would do nothing.
SCORER_OPTIONS: dict[str, tuple[str, ...]] = {
    "exact": ("case_sensitive", "strip"),
    "contains": ("case_sensitive",),
    "regex": ("case_sensitive",),
    "json_equal": (),
    "numeric": ("tolerance", "relative_tolerance"),
    "custom": ("callable",),
    "judge": ("http", "rubric", "max_score", "threshold"),
}
# A rubric is a prompt, not a document; the bound keeps EvalRun objects small.
MAX_RUBRIC_CHARS = 20_000


class Scorer(Frozen):
    """How a case's output is judged against `expected`.

    In a suite file a scorer is either its name (`exact`) or a mapping
    (`{name: numeric, tolerance: 0.01}`); in an EvalRun it is always a mapping
    (`{name: exact}`), because a Kubernetes structural schema gives each field
    one type.
    """

    # The API server's twins of `_needs_its_own_fields`, for the EvalRun CRD.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(self.name == 'custom') == has(self.callable)",
                    "message": "the custom scorer needs `callable: module:function`, "
                    "and only the custom scorer takes one",
                },
                {
                    "rule": "(self.name == 'judge') == has(self.http)",
                    "message": "the judge scorer needs `http` (the model that grades), and only the judge scorer "
                    "takes one",
                },
                # One rule per option group: as one rule its estimated cost, times every case of every
                # suite, is over the API server's budget.
                {
                    "rule": "!has(self.caseSensitive) || self.name != 'numeric' && self.name != 'json_equal' "
                    "&& self.name != 'custom' && self.name != 'judge'",
                    "message": "caseSensitive is an option of the exact, contains and regex scorers only",
                },
                {"rule": "!has(self.strip) || self.name == 'exact'",
                 "message": "strip is an option of the exact scorer only"},
                {"rule": "!(has(self.tolerance) || has(self.relativeTolerance)) || self.name == 'numeric'",
                 "message": "tolerance and relativeTolerance are options of the numeric scorer only"},
                {"rule": "!(has(self.rubric) || has(self.maxScore) || has(self.threshold)) || self.name == 'judge'",
                 "message": "rubric, maxScore and threshold are options of the judge scorer only"},
            ]
        }
    )

    name: ScorerName = Field(
        description="exact, contains, regex, json_equal, numeric, custom (with `callable`) or judge (with `http`).",
        # Bounds the CEL rule above in the API server's cost estimate.
        json_schema_extra={"maxLength": 16},
    )
    case_sensitive: bool = Field(strict=True, default=True, description="exact, contains, regex.")
    strip: bool = Field(strict=True, default=True, description="exact: ignore surrounding whitespace.")
    tolerance: float = Field(strict=True, default=0.0, ge=0, description="numeric: allowed absolute difference.")
    relative_tolerance: float = Field(
        strict=True, default=0.0, ge=0, description="numeric: allowed relative difference."
    )
    callable: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="custom: `module:function(output, expected, case)` returning bool, float or (bool, float).",
    )
    http: HttpTarget | None = Field(
        default=None,
        description="judge: the model that grades, called like an http target (url, model, api_key_env, format, "
        "retries, rate limits of its own).",
    )
    rubric: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_RUBRIC_CHARS,
        description="judge: the prompt; {input}, {output} and {expected} are replaced by the case's. It must ask "
        "for a reply with `SCORE: <number>`, a bare number or JSON {\"score\": <number>}. Default: a rubric "
        "grading the output against expected from 0 to 1.",
    )
    max_score: float = Field(
        strict=True,
        default=1.0, gt=0, description="judge: the top of the rubric's scale (10 for 0 to 10); scores are divided "
        "by it. Default: 1.",
    )
    threshold: float = Field(
        strict=True,
        default=0.5, ge=0, le=1, description="judge: the case passes at this score or above, on the 0 to 1 scale. "
        "Default: 0.5.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @model_validator(mode="after")
    def _needs_its_own_fields(self) -> Scorer:
        if self.name == "custom" and not self.callable:
            raise ValueError("the custom scorer needs `callable: module:function`")
        if self.name != "custom" and self.callable:
            raise ValueError(f"`callable` only applies to the custom scorer, not `{self.name}`")
        if self.name == "judge" and self.http is None:
            raise ValueError("the judge scorer needs `http: {url: ...}`, the model that grades")
        if self.name != "judge" and self.http is not None:
            raise ValueError(f"`http` only applies to the judge scorer, not `{self.name}`")
        if self.rubric is not None and "{output}" not in self.rubric:
            raise ValueError("a judge rubric needs the placeholder {output}, or the judge never sees the output")
        own = SCORER_OPTIONS[self.name]
        foreign = sorted(self.model_fields_set - {"name"} - set(own))
        if foreign:
            raise ValueError(
                f"the {self.name} scorer has no option{'s' if len(foreign) > 1 else ''} "
                + ", ".join(f"`{option}`" for option in foreign) + "; "
                + (f"its options are {', '.join(own)}" if own else "it takes none")
            )
        return self


# ---------------------------------------------------------------- suites

JsonValue = Union[str, int, float, bool, None, list[Any], dict[str, Any]]


class Case(Frozen):
    """One input sent to the target and the expected output it is scored against."""

    id: str = Field(pattern=NAME_PATTERN, description="Unique within the suite.")
    input: JsonValue = Field(description="Sent to the target: text or JSON.")
    expected: JsonValue = Field(default=None, description="What the scorer compares the output with: text or JSON.")
    scorer: Scorer | None = Field(default=None, description="Defaults to the suite's `scorer`.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form data kept with the case.")


DatasetFormat = Literal["jsonl", "csv", "parquet"]
ColumnName = Annotated[str, Field(min_length=1, max_length=256)]
MAX_METADATA_COLUMNS = 64


class DatasetColumns(Frozen):
    """Which columns of a dataset file make a case: the part a suite file and an EvalRun share."""

    format: DatasetFormat | None = Field(
        default=None,
        description="jsonl, csv or parquet. Default: from the file name's extension (.jsonl or .ndjson, .csv, "
        ".parquet; gzipped .jsonl.gz and .csv.gz too).",
    )
    id: ColumnName | None = Field(
        default=None,
        description="Column of case ids. Default: the `id` column if the file has one, else the row number "
        "(`row-1`, `row-2`, ...).",
    )
    input: ColumnName = Field(default="input", description="Column of case inputs. Default: input.")
    expected: ColumnName | None = Field(
        default=None,
        description="Column of expected outputs. Default: the `expected` column if the file has one, else none.",
    )
    metadata: list[ColumnName] = Field(
        default_factory=list,
        max_length=MAX_METADATA_COLUMNS,
        description="Columns kept as each case's metadata, under their own names.",
    )

    def columns(self) -> dict[str, Any]:
        """The column mapping alone, to carry over to another kind of dataset."""
        return {name: getattr(self, name) for name in DatasetColumns.model_fields}


class Dataset(DatasetColumns):
    """A file of cases, one per row: JSON Lines, CSV or Parquet, read with DuckDB."""

    path: str = Field(min_length=1, description="The file; a relative path is relative to the suite file's folder.")


class Suite(Frozen):
    """A named list of cases, run against one target and scored."""

    name: str = Field(pattern=NAME_PATTERN, description="Suite name; recorded on every run.")
    description: str | None = Field(default=None, description="Free text for people.")
    timeout_seconds: float = Field(strict=True, default=30, gt=0, le=86_400, description="Per case.")
    concurrency: int = Field(strict=True, default=4, ge=1, le=1024, description="Cases run at the same time.")
    lock_policy: LockPolicy = Field(
        default=LockPolicy.FORBID,
        description="What a new run does while another run of this suite is live.",
    )
    target: Target = Field(description="What each case is run against.")
    scorer: Scorer = Field(
        default_factory=lambda: Scorer(name="exact"), description="Default scorer for cases without their own."
    )
    # Declared before `cases`, whose validator reads it.
    dataset: Dataset | None = Field(default=None, description="Read the cases from a file instead of `cases`.")
    cases: list[Case] = Field(
        default=None,
        validate_default=True,
        description="The cases; ids unique within the suite. With a `dataset`, the file's rows once loaded "
        "(`suites.load_suite`).",
    )

    @field_validator("cases", mode="before")
    @classmethod
    def _cases_or_dataset(cls, cases: Any, info: ValidationInfo) -> Any:
        if "dataset" not in info.data:
            return cases or []  # the dataset itself is invalid: that error is enough
        has_dataset = info.data["dataset"] is not None
        if cases is None:
            if has_dataset:
                return []  # read from the file by the loader
            raise ValueError("required field is missing: list the cases, or read them from a `dataset`")
        if has_dataset:
            raise ValueError("take the cases from `cases` or from `dataset`, not both")
        if isinstance(cases, list) and not cases:
            raise ValueError("needs at least 1 item (or read the cases from a `dataset`)")
        return cases

    @field_validator("cases")
    @classmethod
    def _unique_case_ids(cls, cases: list[Case]) -> list[Case]:
        seen: set[str] = set()
        dupes = [c.id for c in cases if c.id in seen or seen.add(c.id)]  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate case id(s): {', '.join(sorted(set(dupes)))}")
        return cases

    def scorer_for(self, case: Case) -> Scorer:
        return case.scorer or self.scorer


# ---------------------------------------------------------------- the EvalRun resource
#
# These models are the source of the EvalRun CRD schema (`evalrunner.crd`).
# Every pydantic validator below has a twin the API server runs (a schema
# bound or an `x-kubernetes-validations` CEL rule), so an invalid manifest is
# refused at `kubectl apply`, and the controller refuses the same things when
# it reads a resource that predates a stricter schema.

# A suite name becomes part of ConfigMap, Job and pod names and label values.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONFIGMAP_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# A Kubernetes resource quantity (`500m`, `1.5`, `512Mi`, `1e3`).
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
# metav1.Condition's own bounds.
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

MAX_SUITE_NAME = 40
MAX_SUITES = 50
# Bounds that keep the CEL rules under the API server's cost budget (the cost
# estimator multiplies a rule's cost by the most items it can run over).
MAX_INLINE_CASES = 10_000
# Suite-level fields that a configMapRef suite takes from the referenced file.
INLINE_ONLY_FIELDS = ("description", "timeout_seconds", "concurrency", "target", "scorer", "cases")
EXACTLY_ONE_SOURCE = "a suite needs exactly one of `cases` or `dataset` (an inline suite) or `configMapRef`"


def duplicates(names: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]


def _quantity_text(value: Any) -> Any:
    # YAML `cpu: 1` arrives as an int; Kubernetes accepts it, so do we.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
        }
    ),
]


class ResourceAmounts(Frozen):
    """Amounts of compute resources, as Kubernetes quantities."""

    cpu: Quantity | None = Field(default=None, description="CPU, e.g. `500m` or `2`.")
    memory: Quantity | None = Field(default=None, description="Memory, e.g. `512Mi` or `2Gi`.")
    ephemeral_storage: Quantity | None = Field(
        default=None, alias="ephemeral-storage", description="Local scratch space, e.g. `1Gi`."
    )

    def as_resource_list(self) -> dict[str, str]:
        return self.model_dump(by_alias=True, exclude_none=True)


class Resources(Frozen):
    """Compute resources of each runner pod (the Job's container)."""

    requests: ResourceAmounts | None = Field(default=None, description="What the scheduler reserves for the pod.")
    limits: ResourceAmounts | None = Field(
        default=None, description="Hard caps; a runner above its memory limit is OOM-killed (cause `oom_killed`)."
    )

    def as_requirements(self) -> dict[str, dict[str, str]]:
        out = {}
        for key, amounts in (("requests", self.requests), ("limits", self.limits)):
            if amounts is not None and amounts.as_resource_list():
                out[key] = amounts.as_resource_list()
        return out


class ConfigMapSuiteRef(Frozen):
    """A suite file kept in a ConfigMap in the EvalRun's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="ConfigMap name.")
    key: str = Field(
        default="suite.yaml",
        max_length=253,
        pattern=CONFIGMAP_KEY_PATTERN,
        description="Key holding the suite YAML. Default: suite.yaml.",
    )


# A path inside a volume: relative, with no `.` or `..` segment, so it stays inside the volume.
VOLUME_PATH_SEGMENT = r"(?:[^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)"
VOLUME_PATH_PATTERN = rf"^{VOLUME_PATH_SEGMENT}(?:/{VOLUME_PATH_SEGMENT})*$"
EXACTLY_ONE_DATASET_SOURCE = "a dataset needs exactly one of `configMapRef`, `persistentVolumeClaim` or `imagePath`"
CONFIGMAP_LIMIT_NOTE = (
    "A ConfigMap holds at most 1 MiB; larger files belong on a PersistentVolumeClaim or in the image."
)


class ConfigMapDatasetRef(Frozen):
    """A dataset file kept under a key of a ConfigMap in the EvalRun's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="ConfigMap name.")
    key: str = Field(
        max_length=253,
        pattern=CONFIGMAP_KEY_PATTERN,
        description="Key holding the file (a binary Parquet file is under binaryData). Its extension tells the "
        "format unless `format` is set.",
    )


class VolumeDatasetRef(Frozen):
    """A dataset file on a PersistentVolumeClaim in the EvalRun's namespace."""

    claim_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="PersistentVolumeClaim name.")
    path: str = Field(
        max_length=4096,
        pattern=VOLUME_PATH_PATTERN,
        description="Path of the file inside the volume, e.g. qa/cases.parquet (relative, no `..`).",
    )


class EvalRunDataset(DatasetColumns):
    """Where an inline suite's dataset file is (exactly one source), and which of its columns make a case.

    The runner pod mounts the ConfigMap or the claim read-only; an image path needs no mount.
    """

    # The API server's twin of `_exactly_one_source`, for the EvalRun CRD.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.configMapRef) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) "
                    "+ (has(self.imagePath) ? 1 : 0) == 1",
                    "message": EXACTLY_ONE_DATASET_SOURCE,
                }
            ]
        }
    )

    config_map_ref: ConfigMapDatasetRef | None = Field(
        default=None, description=f"The file under a key of a ConfigMap. {CONFIGMAP_LIMIT_NOTE}"
    )
    persistent_volume_claim: VolumeDatasetRef | None = Field(
        default=None,
        description="The file on a PersistentVolumeClaim, mounted read-only (its access mode must let the runner "
        "pod's node mount it: ReadOnlyMany, ReadWriteMany, or ReadWriteOnce on that node).",
    )
    image_path: str | None = Field(
        default=None,
        max_length=4096,
        pattern=r"^/",
        description="An absolute path in the runner image, e.g. /opt/evalrunner/examples/suites/qa.jsonl.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> EvalRunDataset:
        chosen = [to_camel(f) for f in ("config_map_ref", "persistent_volume_claim", "image_path")
                  if getattr(self, f) is not None]
        if len(chosen) != 1:
            raise ValueError(EXACTLY_ONE_DATASET_SOURCE + (f" (got {', '.join(chosen)})" if chosen else ""))
        return self

    def to_dataset(self, path: str) -> Dataset:
        """The suite file's `dataset`, once the file is at `path` in the runner pod."""
        return Dataset(path=path, **self.columns())


class EvalRunSuite(Frozen):
    """One suite of an EvalRun: inline (`target`, and `cases` or a `dataset`) or by `configMapRef`.

    Each suite runs as its own Job. A configMapRef suite takes everything but
    its name and concurrency policy from the referenced suite file.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.cases) ? 1 : 0) + (has(self.dataset) ? 1 : 0) "
                    "+ (has(self.configMapRef) ? 1 : 0) == 1",
                    "message": EXACTLY_ONE_SOURCE,
                },
                {
                    "rule": "!(has(self.cases) || has(self.dataset)) || has(self.target)",
                    "message": "an inline suite needs a `target`",
                },
                {
                    "rule": "!has(self.configMapRef) || !(has(self.description) || has(self.timeoutSeconds) "
                    "|| has(self.concurrency) || has(self.target) || has(self.scorer))",
                    "message": "a configMapRef suite takes description, timeoutSeconds, concurrency, target and "
                    "scorer from the referenced suite file; remove them here",
                },
            ]
        }
    )

    name: str = Field(
        min_length=1,
        max_length=MAX_SUITE_NAME,
        pattern=DNS_LABEL_PATTERN,
        description="Suite name, unique in the EvalRun: lower-case letters, digits and '-', at most 40 "
        "characters (it becomes part of Job and ConfigMap names).",
    )
    description: str | None = Field(default=None, description="Inline suites: free text for people.")
    timeout_seconds: float | None = Field(
        strict=True,
        default=None, gt=0, le=86_400, description="Inline suites: per-case timeout in seconds. Default: 30."
    )
    concurrency: int | None = Field(
        strict=True,
        default=None, ge=1, le=1024, description="Inline suites: cases run at the same time. Default: 4."
    )
    target: Target | None = Field(default=None, description="Inline suites: what each case is run against.")
    scorer: Scorer | None = Field(
        default=None, description="Inline suites: default scorer for cases without their own. Default: exact."
    )
    cases: list[Case] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_INLINE_CASES,
        description="Inline suites: the cases, ids unique. Large suites belong in a `dataset` (or a ConfigMap, "
        "`configMapRef`).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"]},
    )
    dataset: EvalRunDataset | None = Field(
        default=None,
        description="Inline suites: read the cases from a JSON Lines, CSV or Parquet file (in a ConfigMap, on a "
        "PersistentVolumeClaim or in the image) instead of `cases`.",
    )
    config_map_ref: ConfigMapSuiteRef | None = Field(
        default=None, description="Run the suite file in this ConfigMap instead of inline cases."
    )
    concurrency_policy: LockPolicy | None = Field(
        default=None,
        description="What a new run of this suite does while another run of it is live in this namespace: Allow, Forbid or "
        "Replace. Default: the EvalRun's concurrencyPolicy.",
    )

    @field_validator("cases")
    @classmethod
    def _unique_case_ids(cls, cases: list[Case] | None) -> list[Case] | None:
        if cases and (dupes := duplicates([c.id for c in cases])):
            raise ValueError(f"duplicate case id(s): {', '.join(dupes)}")
        return cases

    @model_validator(mode="after")
    def _inline_or_reference(self) -> EvalRunSuite:
        if [self.cases, self.dataset, self.config_map_ref].count(None) != 2:
            raise ValueError(EXACTLY_ONE_SOURCE)
        if self.is_inline and self.target is None:
            raise ValueError("an inline suite needs a `target`")
        if self.config_map_ref is not None:
            extra = [to_camel(f) for f in INLINE_ONLY_FIELDS if f != "cases" and getattr(self, f) is not None]
            if extra:
                raise ValueError(
                    f"a configMapRef suite takes {', '.join(extra)} from the referenced suite file; remove them here"
                )
        return self

    @property
    def is_inline(self) -> bool:
        return self.config_map_ref is None

    def to_suite(self, lock_policy: LockPolicy, dataset_path: str | None = None) -> Suite:
        """The suite file an inline suite stands for (what the runner loads).

        A dataset suite's file names its dataset at `dataset_path`, where the runner pod finds it.
        """
        if not self.is_inline:
            raise ValueError(f"suite {self.name!r} is a configMapRef suite; its file lives in the ConfigMap")
        fields = {f: getattr(self, f) for f in INLINE_ONLY_FIELDS if getattr(self, f) is not None}
        if self.dataset is not None:
            if dataset_path is None:
                raise ValueError(f"suite {self.name!r} reads a dataset: pass the path its runner pod reads it at")
            fields["dataset"] = self.dataset.to_dataset(dataset_path)
        return Suite(name=self.name, lock_policy=lock_policy, **fields)


class EnvVar(Frozen):
    """An environment variable of the runner container, e.g. the API key an HTTP target reads."""

    name: str = Field(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name.")
    value: str | None = Field(default=None, max_length=32_768, description="A literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes EnvVarSource, e.g. `{secretKeyRef: {name: openai, key: api-key}}`.",
    )

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set `value` or `valueFrom`, not both")
        return self


MAX_RETRIES = 10


class EvalRunSpec(Frozen):
    """What to run: suites, each as a Kubernetes Job of the runner image, with retries that resume."""

    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="The runner image. Default: the controller's own image (the Helm chart's `image` values), "
        "so runners come from the registry the controller was installed from.",
    )
    suites: list[EvalRunSuite] = Field(
        min_length=1,
        max_length=MAX_SUITES,
        description="The suites to run (1 to 50), each as its own Job; names unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    retries: int = Field(
        strict=True,
        default=0,
        ge=0,
        le=MAX_RETRIES,
        description="Pod attempts after the first, per suite; a new attempt resumes, keeping the cases "
        "earlier attempts completed. Default: 0.",
    )
    concurrency_policy: LockPolicy = Field(
        default=LockPolicy.FORBID,
        description="Default for the suites' concurrencyPolicy: what a new run of a suite does while another "
        "run of it is live in this namespace (Allow: run side by side; Forbid: refuse; Replace: terminate the live run). "
        "Default: Forbid.",
    )
    resources: Resources | None = Field(default=None, description="Compute resources of each runner pod.")
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Service account of the runner pods. Its API token is not mounted (runners never call "
        "the Kubernetes API).",
    )
    start_timeout_seconds: int = Field(
        strict=True,
        default=START_TIMEOUT_S,
        ge=1,
        le=86_400,
        description="How long a runner pod may stay Pending with an image-pull or scheduling failure before "
        "its attempt fails with cause never_started. Default: 120.",
    )
    deadline_grace_seconds: int = Field(
        strict=True,
        default=int(DEADLINE_GRACE_S),
        ge=0,
        le=86_400,
        description="Added to timeoutSeconds x cases for each Job's activeDeadlineSeconds. Default: 60.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables of the runner container (e.g. an HTTP target's API key "
        "from a Secret). Names starting with EVALRUNNER_ are reserved for the runner.",
    )
    ttl_seconds_after_finished: int | None = Field(
        strict=True,
        default=None,
        ge=0,
        le=31_536_000,
        description="Have Kubernetes delete each finished Job (and its pod) this many seconds after it ends, "
        "whatever its run row says. Default: the controller deletes it once its run row is closed and the "
        "controller's job TTL (10 minutes by default) has passed.",
    )

    @field_validator("suites")
    @classmethod
    def _unique_suite_names(cls, suites: list[EvalRunSuite]) -> list[EvalRunSuite]:
        if dupes := duplicates([s.name for s in suites]):
            raise ValueError(f"duplicate suite name(s): {', '.join(dupes)}")
        return suites

    def policy_for(self, suite: EvalRunSuite) -> LockPolicy:
        return suite.concurrency_policy or self.concurrency_policy

    def suite(self, name: str) -> EvalRunSuite:
        return next(s for s in self.suites if s.name == name)


class EvalRunPhase(str, enum.Enum):
    """Lifecycle of an EvalRun and of each of its suites."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(Frozen):
    """A Kubernetes condition (metav1.Condition): the latest observation of one aspect of the EvalRun."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase reason for the last transition.",
    )
    message: str = Field(default="", max_length=32_768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was set from."
    )


class EvalRunSuiteStatus(Frozen):
    """The latest attempt of one suite. Results stay in the store; this holds counts and ids."""

    name: str = Field(max_length=MAX_SUITE_NAME, description="Suite name, as in spec.suites.")
    run_id: str | None = Field(default=None, max_length=253, description="Store run id of the latest attempt.")
    attempt: int = Field(default=0, ge=0, description="Latest attempt, from 1; 0 before the first starts.")
    phase: EvalRunPhase = Field(default=EvalRunPhase.PENDING, description="Pending, Running, Succeeded or Failed.")
    passed: int = Field(default=0, ge=0, description="Cases that passed.")
    failed: int = Field(default=0, ge=0, description="Cases scored as failing.")
    errored: int = Field(default=0, ge=0, description="Cases that could not be run or scored.")
    cause: Cause | None = Field(default=None, description="Why the latest attempt failed, from a closed set.")
    message: str | None = Field(default=None, max_length=4096, description="Details of the latest transition.")
    job_name: str | None = Field(default=None, max_length=63, description="Job of the latest attempt.")


class EvalRunStatus(Frozen):
    """Observed state, rebuilt by the controller from the Jobs, pods and store rows."""

    phase: EvalRunPhase = Field(default=EvalRunPhase.PENDING, description="Pending, Running, Succeeded or Failed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        description="Kubernetes-style conditions, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    suites: list[EvalRunSuiteStatus] = Field(
        default_factory=list,
        max_length=MAX_SUITES,
        description="Per suite: latest attempt, run id, counts and cause.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    progress: str | None = Field(
        default=None,
        max_length=16,
        pattern=r"^[0-9]+/[0-9]+$",
        description="Finished suites out of all suites, e.g. 1/2 (the Suites column of kubectl get).",
    )
    started_at: datetime | None = Field(default=None, description="When the first Job was created.")
    completed_at: datetime | None = Field(default=None, description="When the last suite finished.")
    passed: int = Field(default=0, ge=0, description="Cases that passed, over all suites' latest attempts.")
    failed: int = Field(default=0, ge=0, description="Cases scored as failing, over all suites' latest attempts.")
    errored: int = Field(default=0, ge=0, description="Cases that errored, over all suites' latest attempts.")
