"""The runner API as an OpenAPI 3.0 document, built from the bounds the wire parser enforces.

`openapi.json` beside this module is what `GET /api/v1/openapi.json` serves
and what the package ships; it is generated from `build_spec()` and a unit
test checks that the two have not drifted:

    python -c 'from evalrunner.service.openapi import spec_text; print(spec_text(), end="")' \
        > operator/evalrunner/service/openapi.json

Every status a route can answer is listed with its body's schema, so a
client (or a fuzzer) can check each reply against it.
"""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from typing import Any

from aiohttp import web

from ..models import NAME_PATTERN, LockPolicy
from ..owner import Owner
from ..store import wire
from ..store.records import CaseEvent, CaseRow, RunRow

SPEC_FILE = "openapi.json"
SPEC_PATH = f"{wire.API_PREFIX}/openapi.json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_TIMESTAMP = {"type": "string", "format": "date-time"}
_NAME = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 63}
_RUN_ID = {"type": "string", "pattern": wire.RUN_ID_PATTERN, "maxLength": 253}
_STATUS = {"type": "string", "enum": list(wire.RUN_STATUSES)}
_CAUSE = {"type": "string", "enum": list(wire.CAUSES)}


def _text(max_chars: int) -> dict[str, Any]:
    return _nullable({"type": "string", "maxLength": max_chars})


def _names() -> dict[str, Any]:
    return {"type": "array", "items": _NAME, "uniqueItems": True}


def _owner() -> dict[str, Any]:
    label = _text(wire.MAX_LABEL_CHARS)
    return {
        "type": "object",
        "description": "Who runs the suite: a local process (host, pid, start time) or a Job pod.",
        "required": ["kind"],
        "additionalProperties": False,
        "properties": {
            "kind": {"type": "string", "enum": ["process", "pod"]},
            "host": label,
            "pid": _nullable({"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
            "process_started_at": _nullable({"type": "number", "minimum": 0, "maximum": 2**40}),
            "namespace": label,
            "pod": label,
            "pod_uid": label,
        },
    }


def _run_request() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["suite", "case_names", "timeout_seconds", "owner"],
        "additionalProperties": False,
        "properties": {
            "suite": _NAME,
            "case_names": {**_names(), "description": "Cases this attempt runs (carried-over ones excluded)."},
            "timeout_seconds": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                "maximum": wire.MAX_TIMEOUT_S, "description": "Per case."},
            "owner": _ref("OwnerIn"),
            "lock_policy": {"type": "string", "enum": [p.value for p in LockPolicy], "default": "Forbid"},
            "deadline_grace_seconds": {"type": "number", "minimum": 0, "maximum": wire.MAX_DEADLINE_GRACE_S},
            "parent_run_id": _nullable(_RUN_ID),
            "carried_case_names": {**_names(), "description": "Completed cases copied from the parent run."},
            "source": _text(wire.MAX_SOURCE_CHARS),
            "run_id": _nullable({**_RUN_ID, "description": "Chosen by the caller when it must be known in advance."}),
            "scope": _nullable({"type": "string", "pattern": wire.SCOPE_PATTERN,
                                "description": "namespace/name/uid of the EvalRun; an EvalRun token's own."}),
            "admitted": {"type": "boolean", "description": "The lock policy was already applied (controller)."},
        },
    }


def _case_event() -> dict[str, Any]:
    tokens = _nullable({"type": "integer", "minimum": 0, "maximum": 2**31 - 1})
    return {
        "type": "object",
        "description": "The latest state of one case row of the path's run; row_id is `{run_id}/{name}`.",
        "required": ["row_id", "run_id", "name", "status", "started_at"],
        "additionalProperties": False,
        "properties": {
            "row_id": {"type": "string", "maxLength": 2 * wire.MAX_LABEL_CHARS},
            "run_id": {"type": "string", "maxLength": 2 * wire.MAX_LABEL_CHARS},
            "name": _NAME,
            "status": _STATUS,
            "started_at": _TIMESTAMP,
            "completed_at": _nullable(_TIMESTAMP),
            "error": _text(wire.MAX_TEXT_CHARS),
            "cause": _nullable(_CAUSE),
            "passed": _nullable({"type": "boolean"}),
            "score": _nullable(_NUMBER),
            "output": _text(wire.MAX_OUTPUT_WIRE_CHARS),
            "detail": _text(wire.MAX_TEXT_CHARS),
            "duration_ms": _nullable({"type": "number", "minimum": 0, "maximum": 1e15}),
            **{key: tokens for key in wire.TOKEN_FIELDS},
        },
    }


def _events(description: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref("CaseEvent"), "maxItems": wire.MAX_EVENTS_PER_BATCH,
            "description": description}


def _finish_request() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["completed", "failed"]},
            "cause": _nullable(_CAUSE),
            "error": _text(wire.MAX_TEXT_CHARS),
            "unsaved_cases": _nullable({
                "type": "object", "description": "Case row id (`{run_id}/{name}`) -> why its save failed.",
                "additionalProperties": {"type": "string", "maxLength": wire.MAX_TEXT_CHARS},
            }),
            "case_events": _nullable(_events("Latest states of case rows whose saves failed; they land with the close.")),
        },
    }


_ROW_TYPES = {"str": _STRING, "int": _INT, "float": _NUMBER, "bool": {"type": "boolean"}, "datetime": _TIMESTAMP}


def _row(record: type, required_not_null: tuple[str, ...], overrides: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the API returns it: every field of the record, nullable unless always set."""
    properties = {}
    for f in fields(record):
        type_name = str(f.type).split(" | ")[0]
        schema = overrides.get(f.name, _ROW_TYPES.get(type_name, {}))
        properties[f.name] = schema if f.name in required_not_null else _nullable(schema)
    return {"type": "object", "required": [f.name for f in fields(record)], "properties": properties}


def _run_row() -> dict[str, Any]:
    owner_out = {"type": "object", "properties": {f.name: {} for f in fields(Owner)}}
    return _row(RunRow, ("id", "suite", "status", "created_at", "attempt"),
                {"status": _STATUS, "owner": owner_out, "scope": _STRING})


def _error(description: str, **extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description, "required": ["error", *extra],
            "properties": {"error": {"type": "string", "description": "What is wrong, naming the field."}, **extra}}


SCHEMAS: dict[str, Any] = {
    "Error": _error("A refused request."),
    "Busy": _error("The write queue is full: retry after `retry_after_s` (also the Retry-After header).",
                   kind={"type": "string", "enum": ["busy"]}, retry_after_s=_NUMBER),
    "Conflict": {**_error("The suite's lock policy refused the run, or its run id is taken by another owner.",
                          kind={"type": "string", "enum": ["refused", "run_id_taken"]}),
                 "properties": {"error": _STRING, "kind": {"type": "string", "enum": ["refused", "run_id_taken"]},
                                "suite": _STRING, "live_run_ids": {"type": "array", "items": _STRING},
                                "owners": {"type": "array", "items": _STRING}}},
    "OwnerIn": _owner(),
    "RunRequest": _run_request(),
    "RunRow": _run_row(),
    "Admission": {"type": "object", "required": ["run", "replaced"], "properties": {
        "run": _ref("RunRow"), "replaced": {"type": "array", "items": _ref("RunRow")}}},
    "CaseEvent": _case_event(),
    "CaseBatch": {"type": "object", "required": ["events"], "additionalProperties": False,
                  "properties": {"events": _events("At most 10,000 per request; split larger batches.")}},
    "CaseRow": _row(CaseRow, ("id", "run_id", "name", "status", "created_at"), {"status": _STATUS}),
    "SaveReport": {"type": "object", "required": ["failures", "fenced"], "properties": {
        "failures": {"type": "object", "additionalProperties": _STRING,
                     "description": "Case row id -> why it could not be saved (its siblings were)."},
        "fenced": {"type": "boolean", "description": "The run is no longer running: stop writing."}}},
    "FinishRequest": _finish_request(),
    "FinishReply": {"type": "object", "required": ["applied", "run"], "properties": {
        "applied": {"type": "boolean", "description": "False: someone else closed the run first (fenced)."},
        "run": _ref("RunRow")}},
}
assert {f.name for f in fields(CaseEvent)} == set(SCHEMAS["CaseEvent"]["properties"])


def _reply(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        reply["headers"] = headers
    return reply


_UNAUTHORIZED = _reply("Missing or unknown bearer token.", "Error")
_FORBIDDEN = _reply("The token's EvalRun may not touch this run (or these rows).", "Error")
_NOT_FOUND = _reply("No such run.", "Error")
# The HTTP parser refuses a request line or header over 8,190 bytes before the API sees it, in plain text.
_BAD = {"description": "A malformed body or query (the message names the field); in text/plain, a request line "
                       "or header too long for the HTTP parser.",
        "content": {"application/json": {"schema": _ref("Error")}, "text/plain": {"schema": {"type": "string"}}}}
_TOO_LARGE = _reply("The body is over the byte limit, or carries more than 10,000 case events.", "Error")
_BUSY = _reply("The write queue is full; retry later.", "Busy",
               {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}})
_RUN_ID_PARAM = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _op(summary: str, responses: dict[str, Any], body: str | None = None, run_path: bool = False,
        query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, "400": _BAD, "401": _UNAUTHORIZED}}
    params = ([_RUN_ID_PARAM] if run_path else []) + (query or [])
    if run_path:
        op["responses"].update({"403": _FORBIDDEN, "404": _NOT_FOUND})
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = _body(body)
        op["responses"]["413"] = _TOO_LARGE
    return op


def build_spec() -> dict[str, Any]:
    p = wire.API_PREFIX
    list_query = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": wire.MAX_LIST_LIMIT, "default": 50}},
        {"name": "status", "in": "query", "required": False, "schema": _STATUS},
        {"name": "suite", "in": "query", "required": False,
         "schema": {"type": "string", "maxLength": wire.MAX_LABEL_CHARS}},
    ]
    paths = {
        f"{p}/runs": {
            "post": _op("Open a run (an EvalRun token: within its own EvalRun).", {
                "201": _reply("The run is open (or a retried start got it back).", "Admission"),
                "403": _reply("This token may not open runs for another EvalRun, or resume another's run.", "Error"),
                "409": _reply("Refused by the suite's lock policy, or the run id is another owner's.", "Conflict"),
            }, body="RunRequest"),
            "get": _op("Runs, newest first: an EvalRun token sees its own, the admin all.", {
                "200": {"description": "Runs.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["runs"],
                    "properties": {"runs": {"type": "array", "items": _ref("RunRow")}}}}}},
            }, query=list_query),
        },
        f"{p}/runs/{{run_id}}": {
            "get": _op("One run.", {"200": _reply("The run.", "RunRow")}, run_path=True),
        },
        f"{p}/runs/{{run_id}}/cases": {
            "get": _op("The run's case rows.", {"200": {"description": "Case rows.", "content": {
                "application/json": {"schema": {"type": "object", "required": ["cases"], "properties": {
                    "cases": {"type": "array", "items": _ref("CaseRow")}}}}}}}, run_path=True),
            "post": _op("Save the latest state of case rows of this run (group-committed).", {
                "200": _reply("Saved, but for the failures listed; fenced: the run is closed.", "SaveReport"),
                "503": _BUSY,
            }, body="CaseBatch", run_path=True),
        },
        f"{p}/runs/{{run_id}}/completed-cases": {
            "get": _op("Names of the run's completed cases (what a resumed attempt carries over).", {
                "200": {"description": "Case names.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["names"],
                    "properties": {"names": {"type": "array", "items": _STRING}}}}}}}, run_path=True),
        },
        f"{p}/runs/{{run_id}}/heartbeat": {
            "post": _op("Refresh the run's heartbeat lease (no body needed).", {
                "200": {"description": "alive: false means the run is closed; stop.", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["alive"],
                                                    "properties": {"alive": {"type": "boolean"}}}}}},
                "503": _BUSY,
            }, run_path=True),
        },
        f"{p}/runs/{{run_id}}/finish": {
            "post": _op("The runner's own close of its run, with the case results whose saves failed.", {
                "200": _reply("applied: this close (or a retry of it) landed.", "FinishReply"),
            }, body="FinishRequest", run_path=True),
        },
        SPEC_PATH: {
            "get": {"summary": "This document.", "security": [], "responses": {
                "200": {"description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Eval runner store API",
            "version": "1",
            "description": "What runners (Job pods), the controller and the CLI write and read through the "
                           "store service. Every call is idempotent. An EvalRun's token reaches its own runs only; "
                           "the admin token all of them.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An EvalRun's token (its Secret) or the admin token."}},
        },
        "security": [{"bearer": []}],
    }


def spec_text() -> str:
    return json.dumps(build_spec(), indent=2, sort_keys=True) + "\n"


def shipped_spec() -> bytes:
    return resources.files(__package__).joinpath(SPEC_FILE).read_bytes()


def add_routes(app: web.Application) -> None:
    body = shipped_spec()

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(SPEC_PATH, serve)
