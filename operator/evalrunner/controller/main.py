"""`evalrunner controller`: the operator and the store service in one process.

One process holds the DuckDB file, so it is the only writer
(docs/ARCHITECTURE.md, invariant 2), and the file lock doubles as the leader
lock: a second controller on the same file stops at once with a clear error
instead of acting alongside the first. Deploy one replica with
`strategy: Recreate`.

The event loop runs four things: kopf's watch of EvalRuns, the store service
(aiohttp) for runner pods, a scan loop that classifies pods against the
clock and sweeps stale rows, and a refresh loop that reconciles the EvalRuns
events marked. Beside it, informer threads follow runner pods, Jobs and
nodes into the controller's index. Every store write of all of them goes
through the store's one writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass

import kopf
from aiohttp import web
from kubernetes import client, config

from .. import local_server, log
from ..service import build_app
from ..store.duckdb_store import DuckDBStore
from . import handlers  # noqa: F401  (registers the kopf handlers)
from ..timing import (API_CONNECT_TIMEOUT_S, API_REQUEST_TIMEOUT_S, HEARTBEAT_LEASE_S, JOB_TTL_S, SCAN_INTERVAL_S,
                      SWEEP_INTERVAL_S)
from .builders import DEFAULT_RUNNER_IMAGE
from .health import Health
from .announcer import Announcer
from .index import NODE, POD, ClusterIndex, IndexedKube
from .informer import Informer
from .kube import Kube
from .pod_tokens import DEFAULT_AUDIENCE, PodTokens
from .wiring import Controller, ControllerSettings


@dataclass(frozen=True)
class ControllerOptions:
    db: str
    kubeconfig: str | None
    namespaces: tuple[str, ...]  # empty: every namespace
    host: str
    port: int
    store_url_for_pods: str | None
    admin_token: str | None
    scan_interval_s: float = SCAN_INTERVAL_S
    sweep_interval_s: float = SWEEP_INTERVAL_S
    heartbeat_lease_s: float = HEARTBEAT_LEASE_S
    job_ttl_s: float | None = JOB_TTL_S
    api_timeout_s: float = API_REQUEST_TIMEOUT_S
    runner_image: str = DEFAULT_RUNNER_IMAGE
    retain_days: float = 0  # 0 keeps every closed run
    token_audience: str = DEFAULT_AUDIENCE  # of runner pods' service-account tokens; one per release
    read_token: str | None = None  # set: reading /evals and /metrics needs a credential
    secure_cookies: bool | None = None


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class NoKubernetesCredentials(Exception):
    """Neither a pod's service-account token nor a kubeconfig: say which, and how to give one."""


def api_client_for(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        try:
            return config.new_client_from_config(config_file=kubeconfig)
        except (config.ConfigException, OSError) as exc:
            raise NoKubernetesCredentials(f"cannot use kubeconfig {kubeconfig}: {exc}") from None
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException as in_cluster:
        try:
            return config.new_client_from_config()
        except (config.ConfigException, OSError):
            raise NoKubernetesCredentials(
                f"no Kubernetes credentials. In a pod: {in_cluster} (expected at {SERVICE_ACCOUNT_TOKEN}); "
                "run the controller with a service account whose token is mounted "
                "(automountServiceAccountToken: true, as the Helm chart does). Outside a cluster: "
                "give --kubeconfig FILE, or set KUBECONFIG, or create ~/.kube/config."
            ) from None


def run_controller(options: ControllerOptions) -> int:
    log.route_library_logs()  # kopf's and the client's own lines, as our events
    api_client = api_client_for(options.kubeconfig)  # no credentials: a clear error before anything starts
    store = DuckDBStore.open(options.db)  # a held lock raises StoreLockedError: another controller is active
    try:
        if options.kubeconfig:
            os.environ["KUBECONFIG"] = options.kubeconfig  # kopf logs in through the same file
        kube = Kube(api_client,
                    request_timeout=(min(API_CONNECT_TIMEOUT_S, options.api_timeout_s), options.api_timeout_s))
        settings = ControllerSettings(
            store_url_for_pods=options.store_url_for_pods or f"http://{options.host}:{options.port}",
            namespaces=options.namespaces,
            scan_interval_s=options.scan_interval_s,
            sweep_interval_s=options.sweep_interval_s,
            heartbeat_lease_s=options.heartbeat_lease_s,
            job_ttl_s=options.job_ttl_s,
            runner_image=options.runner_image,
            token_audience=options.token_audience,
        )
        index = ClusterIndex()
        health = Health(details=lambda: {"index": index.counts(), "index_synced": index.synced()})
        announcer = Announcer(IndexedKube(kube, index)).start()
        controller = Controller(store, kube, settings, index=index, progress=lambda: health.progressed("refresh"),
                                announce=announcer)
        informers = [Informer(source, index, _event_handler(controller, source.kind, health),
                              on_listing=_listing_handler(controller, source.kind, health))
                     for source in kube.sources(options.namespaces)]
        for informer in informers:
            informer.start()
        try:
            asyncio.run(_serve(options, store, controller, health, informers))
        finally:
            for informer in informers:
                informer.stop()
            announcer.stop()
    finally:
        store.close()
    return 0


def _event_handler(controller: Controller, kind: str, health: Health):
    if kind == POD:
        def on_pod(event_type: str, pod: dict) -> None:
            health.saw_event()
            controller.on_runner_pod_event(pod, event_type)
        return on_pod
    if kind == NODE:
        return lambda event_type, node: controller.on_node_event(node, event_type)
    return lambda event_type, job: controller.on_runner_job_event(job, event_type)


def _listing_handler(controller: Controller, kind: str, health: Health):
    """Runner pods' listings go to the controller at once (it reads their rows in bulk); other kinds' as events."""
    if kind != POD:
        return None

    def on_pods_listed(pods: list[dict]) -> None:
        health.saw_event()
        controller.on_runner_pods_listed(pods)
    return on_pods_listed


async def _serve(options: ControllerOptions, store: DuckDBStore, controller: Controller, health: Health,
                 informers: list[Informer]) -> None:
    local_token = local_server.new_token()  # this host's CLI works through the controller (local_server.py)
    pod_tokens = PodTokens(controller.kube, options.token_audience, options.namespaces)
    app = build_app(store, admin_token=options.admin_token, health=health.report, on_change=controller.on_run_changed,
                    local_token=local_token, retain_days=options.retain_days, pod_tokens=pod_tokens.caller,
                    read_token=options.read_token, secure_cookies=options.secure_cookies)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, options.host, options.port).start()
    port = runner.addresses[0][1] if runner.addresses else options.port
    record = local_server.publish(store.path, local_server.client_url(options.host, port), local_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger = log.get(component="controller")
    logger.info("controller.started", db=store.path, namespaces=list(options.namespaces) or "*",
                store_url=controller.settings.store_url_for_pods, listen=f"{options.host}:{options.port}")

    # On start, every running row is reconciled against the pods that exist, before any new work.
    # The informers' first listing makes that sweep cost no request per row; without it (the API
    # server is slow or away) the sweep asks the API for each row's pod, with timeouts.
    # The listings get one request timeout to arrive.
    if not await asyncio.to_thread(_wait_synced, informers, options.api_timeout_s):
        logger.warning("controller.index_not_synced", waited_s=options.api_timeout_s,
                       detail="sweeping with API reads meanwhile; the watches keep retrying")
    await asyncio.to_thread(_sweep, controller, health, logger)
    namespaces = list(options.namespaces)
    ready = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(
        namespaces=namespaces, clusterwide=not namespaces, standalone=True,
        memo=kopf.Memo(controller=controller, health=health), stop_flag=stop, ready_flag=ready,
    ))
    scanner = asyncio.create_task(_scan_loop(controller, health, options, stop, logger))
    refresher = asyncio.create_task(_refresh_loop(controller, stop, logger))
    stopped, started = asyncio.create_task(stop.wait()), asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({operator, stopped, started}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set() and not stop.is_set():
            # Starting, kopf put its own SIGTERM/SIGINT handlers in place of ours: they stop kopf
            # alone, which then waits 5 s for our loops as "hung" tasks. Take the signals back.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        # The operator task ending is a stop too: a kopf that died must not leave a process
        # that serves the store but watches nothing.
        await asyncio.wait({operator, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        logger.info("controller.stopping")
        stop.set()
        await asyncio.wait_for(asyncio.gather(operator, return_exceptions=True), timeout=15)
        scanner.cancel()
        refresher.cancel()
        started.cancel()
        await asyncio.gather(scanner, refresher, stopped, started, return_exceptions=True)
        local_server.withdraw(store.path, record)
        await runner.cleanup()
    if not operator.cancelled() and (error := operator.exception()) is not None:
        raise error


async def _scan_loop(controller: Controller, health: Health, options: ControllerOptions,
                     stop: asyncio.Event, logger) -> None:
    next_sweep = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.to_thread(controller.scan)
        except Exception as exc:  # keep scanning; the next round retries
            logger.error("controller.scan_failed", error=f"{type(exc).__name__}: {exc}")
        if loop.time() >= next_sweep:  # _sweep logs its own failure
            await asyncio.to_thread(_sweep, controller, health, logger)
            next_sweep = loop.time() + options.sweep_interval_s
        health.progressed("scan")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=options.scan_interval_s)


async def _refresh_loop(controller: Controller, stop: asyncio.Event, logger) -> None:
    """Rebuilds the status of EvalRuns marked dirty, coalescing bursts of events."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(controller.refresh)
        except Exception as exc:
            logger.error("controller.refresh_failed", error=f"{type(exc).__name__}: {exc}")
        controller.progress()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.2)


def _sweep(controller: Controller, health: Health, logger) -> None:
    try:
        controller.sweep()
        health.swept()
    except Exception as exc:
        logger.error("controller.sweep_failed", error=f"{type(exc).__name__}: {exc}")


def _wait_synced(informers: list[Informer], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    return all(informer.synced.wait(max(0.0, deadline - time.monotonic())) for informer in informers)
