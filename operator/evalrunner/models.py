"""The data the product speaks in: suites, cases, targets, scorers, run states.

These frozen pydantic models are the single source of truth for the suite
file format and (later) the EvalRun CRD schema. Field names are snake_case in
Python and in suite files; camelCase aliases (`timeoutSeconds`) are accepted
too, because the same suite is embedded in Kubernetes manifests.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# A case id or suite name becomes part of row ids, log lines and Kubernetes
# object names, so keep it to a safe, readable alphabet.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


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


class HttpTarget(Frozen):
    """POST the case input to an HTTP JSON endpoint."""

    url: str = Field(pattern=r"^https?://", description="Endpoint URL (http or https).")
    format: Literal["openai-chat", "json"] = Field(
        default="openai-chat",
        description="`openai-chat`: an OpenAI-compatible chat-completions call; "
        "`json`: POST {\"input\": ...} and read `output_field` of the reply.",
    )
    model: str | None = Field(default=None, description="Model name sent in openai-chat requests.")
    system_prompt: str | None = None
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the bearer token; never the key itself.",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    output_field: str = Field(default="output", description="Reply field read by the `json` format.")


class CommandTarget(Frozen):
    """Run a command per case: input on stdin, output read from stdout."""

    argv: list[str] = Field(min_length=1, description="Program and arguments (no shell).")
    env: dict[str, str] = Field(default_factory=dict)


class Target(Frozen):
    """Exactly one of `python`, `http` or `command`."""

    python: PythonTarget | None = None
    http: HttpTarget | None = None
    command: CommandTarget | None = None

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

ScorerName = Literal["exact", "contains", "regex", "json_equal", "numeric", "custom"]


class Scorer(Frozen):
    """How a case's output is judged against `expected`.

    In a suite file a scorer is either its name (`exact`) or a mapping
    (`{name: numeric, tolerance: 0.01}`).
    """

    name: ScorerName
    case_sensitive: bool = Field(default=True, description="exact, contains, regex.")
    strip: bool = Field(default=True, description="exact: ignore surrounding whitespace.")
    tolerance: float = Field(default=0.0, ge=0, description="numeric: allowed absolute difference.")
    relative_tolerance: float = Field(default=0.0, ge=0, description="numeric: allowed relative difference.")
    callable: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="custom: `module:function(output, expected, case)` returning bool, float or (bool, float).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @model_validator(mode="after")
    def _custom_needs_callable(self) -> Scorer:
        if self.name == "custom" and not self.callable:
            raise ValueError("the custom scorer needs `callable: module:function`")
        if self.name != "custom" and self.callable:
            raise ValueError(f"`callable` only applies to the custom scorer, not `{self.name}`")
        return self


# ---------------------------------------------------------------- suites

JsonValue = Union[str, int, float, bool, None, list[Any], dict[str, Any]]


class Case(Frozen):
    id: str = Field(pattern=NAME_PATTERN, description="Unique within the suite.")
    input: JsonValue = Field(description="Sent to the target: text or JSON.")
    expected: JsonValue = None
    scorer: Scorer | None = Field(default=None, description="Defaults to the suite's `scorer`.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class Suite(Frozen):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    timeout_seconds: float = Field(default=30, gt=0, le=86_400, description="Per case.")
    concurrency: int = Field(default=4, ge=1, le=1024)
    lock_policy: LockPolicy = Field(
        default=LockPolicy.FORBID,
        description="What a new run does while another run of this suite is live.",
    )
    target: Target
    scorer: Scorer = Field(default_factory=lambda: Scorer(name="exact"))
    cases: list[Case] = Field(min_length=1)

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


def is_terminal(status: str) -> bool:
    return status in (RunStatus.COMPLETED.value, RunStatus.FAILED.value)


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    return _SAFE.sub("-", text)
