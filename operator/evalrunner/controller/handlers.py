"""kopf handlers: thin. Each reads the event and hands it to the Controller (in `memo`).

kopf follows the EvalRuns only. Runner pods, Jobs and nodes come through the
controller's own informers (`informer.py`): kopf filters labels in the
client, so it would stream every pod of the cluster to find ours, where an
informer has the API server select them.

EvalRuns are watched with `on.event`, never on.create/update: those would
write kopf's annotations onto the objects. The handler is sync, so kopf runs
it in its thread pool and the blocking Kubernetes client and DuckDB calls
never stall the event loop.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ..crd import GROUP, VERSION

PLURAL = "evalruns"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Watches can stall silently: bound every request and let kopf reconnect.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30  # and every other request of kopf's (the default is 5 minutes)
    settings.networking.connect_timeout = 10
    # Namespaces are named exactly and resources are fixed, so kopf needs no
    # cluster-wide watch of Namespaces and CRDs (and the chart grants none).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as our own client (kubeconfig or in-cluster)."""
    cfg = memo.controller.kube.api_client.configuration
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if token and token.lower().startswith("bearer "):
        token = token[len("bearer "):]
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        token=token or None,
    )


@kopf.on.event(GROUP, VERSION, PLURAL)
def evalrun_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every EvalRun event, including the initial listing on start (the resume path).

    `on.event` rather than `on.create`: kopf then keeps no progress annotations
    on the object, so the controller writes only the status subresource and a
    GitOps tool sees no drift. Reconciling is idempotent, so repeats are harmless.
    """
    memo.controller.on_evalrun_event(_plain(event["object"]), event.get("type"))


def _plain(obj: Any) -> dict[str, Any]:
    return dict(obj) if not isinstance(obj, dict) else obj
