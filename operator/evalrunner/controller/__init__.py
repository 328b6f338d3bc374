"""The Kubernetes operator for EvalRun resources.

Thin kopf handlers over pure functions: `builders` makes the child objects
(ConfigMap, Job) from plain dicts and models, `classify` turns
a pod (and its node and Job) into the cause of a runner's death. Both are
unit-tested with plain data; the handlers are tested against a real API server.
"""
