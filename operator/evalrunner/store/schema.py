"""The database schema as an ordered list of migrations.

`schema_version` records each applied migration. A database written by a
newer release (a version above `CURRENT_VERSION`) is refused rather than
guessed at. Constraints are kept to single-column primary keys: DuckDB turns
an UPDATE of an indexed column into delete+insert, and foreign keys block
later ALTERs.

Timestamps are TIMESTAMPTZ so that the runbook's
`completed_at = CURRENT_TIMESTAMP` stores the same instant we would.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "eval_runs and eval_cases with owner, heartbeat, deadline and cause",
        (
            """
            CREATE TABLE eval_runs (
                id               VARCHAR PRIMARY KEY,
                suite            VARCHAR NOT NULL,
                status           VARCHAR NOT NULL,
                created_at       TIMESTAMPTZ NOT NULL,
                started_at       TIMESTAMPTZ,
                completed_at     TIMESTAMPTZ,
                error            VARCHAR,
                cause            VARCHAR,
                owner            VARCHAR,
                heartbeat_at     TIMESTAMPTZ,
                deadline_at      TIMESTAMPTZ,
                attempt          INTEGER NOT NULL DEFAULT 1,
                parent_run_id    VARCHAR,
                timeout_seconds  DOUBLE,
                case_count       INTEGER,
                passed           INTEGER,
                failed           INTEGER,
                errored          INTEGER,
                lock_policy      VARCHAR,
                terminated_by    VARCHAR,
                source           VARCHAR
            )
            """,
            """
            CREATE TABLE eval_cases (
                id            VARCHAR PRIMARY KEY,
                run_id        VARCHAR NOT NULL,
                name          VARCHAR NOT NULL,
                status        VARCHAR NOT NULL,
                created_at    TIMESTAMPTZ NOT NULL,
                started_at    TIMESTAMPTZ,
                completed_at  TIMESTAMPTZ,
                error         VARCHAR,
                cause         VARCHAR,
                passed        BOOLEAN,
                score         DOUBLE,
                output        VARCHAR,
                detail        VARCHAR,
                duration_ms   DOUBLE,
                carried_from  VARCHAR
            )
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "scope of a run (the EvalRun that owns it) and bearer tokens for the store service",
        (
            "ALTER TABLE eval_runs ADD COLUMN scope VARCHAR",
            """
            CREATE TABLE api_tokens (
                token_sha256  VARCHAR PRIMARY KEY,
                scope         VARCHAR NOT NULL,
                created_at    TIMESTAMPTZ NOT NULL
            )
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "token usage of each case, and of each run (summed when it closes)",
        tuple(
            f"ALTER TABLE {table} ADD COLUMN {column} {kind}"
            # A run's sum may pass 2^31 where a case's count cannot.
            for table, kind in (("eval_cases", "INTEGER"), ("eval_runs", "BIGINT"))
            for column in ("prompt_tokens", "completion_tokens", "total_tokens")
        ),
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "an index on eval_cases.run_id: closing a run, its tallies and retention look up its cases",
        # A plain (non-unique) ART index on a column no statement updates: the upsert of case rows
        # inserts with it and never changes it, so DuckDB's delete+insert of updated rows cannot
        # trip a duplicate-key check on it.
        ("CREATE INDEX IF NOT EXISTS eval_cases_run_id ON eval_cases (run_id)",),
    ),
)

CURRENT_VERSION = MIGRATIONS[-1].version
