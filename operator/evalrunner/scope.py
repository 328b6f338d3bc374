"""Scope: the EvalRun a cluster run belongs to (namespace, name, uid).

A run opened by a Job pod carries the scope of the EvalRun that made the Job;
the EvalRun's token may write only runs of that scope, and a suite's lock
policy applies among the runs of one namespace. Local runs have no scope.
In the database and on the wire a scope is the text `namespace/name/uid`;
everywhere else it is this type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Scope:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}/{self.uid}"

    @classmethod
    def parse(cls, text: str | None) -> Scope | None:
        """The scope written as `namespace/name/uid`, or None for no (or malformed) text."""
        if not text:
            return None
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            return None
        return cls(*parts)

    @classmethod
    def of(cls, evalrun: dict[str, Any]) -> Scope:
        """The scope of an EvalRun object, as the API server returns it."""
        meta = evalrun["metadata"]
        return cls(meta["namespace"], meta["name"], meta["uid"])

    @property
    def evalrun(self) -> tuple[str, str]:
        """(namespace, name): how the API finds the EvalRun (a recreated one has a new uid)."""
        return self.namespace, self.name


def lock_domain(scope: Scope | None) -> str | None:
    """Where a suite's lock policy applies: the namespace in a cluster; among local runs, None.

    Two teams' suites named `smoke` in different namespaces are different suites.
    """
    return scope.namespace if scope else None
