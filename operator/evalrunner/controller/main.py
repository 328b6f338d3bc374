"""`evalrunner controller`: the operator and the store service in one process.

One process holds the DuckDB file, so it is the only writer
(docs/ARCHITECTURE.md, invariant 2), and the file lock doubles as the leader
lock: a second controller on the same file stops at once with a clear error
instead of acting alongside the first. Deploy one replica with
`strategy: Recreate`.

The event loop runs four things: kopf's watches (EvalRuns, runner pods and
Jobs), the store service (aiohttp) for runner pods, a scan loop that
classifies pods against the clock and sweeps stale rows, and a refresh loop
that reconciles the EvalRuns events marked. Every store write of all of them
goes through the store's one writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

import kopf
from aiohttp import web
from kubernetes import client, config

from .. import log
from ..service import build_app
from ..store.duckdb_store import DuckDBStore
from . import handlers  # noqa: F401  (registers the kopf handlers)
from ..timing import HEARTBEAT_LEASE_S, SCAN_INTERVAL_S, SWEEP_INTERVAL_S
from .health import Health
from .kube import Kube
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


def api_client_for(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def run_controller(options: ControllerOptions) -> int:
    store = DuckDBStore.open(options.db)  # a held lock raises StoreLockedError: another controller is active
    try:
        if options.kubeconfig:
            os.environ["KUBECONFIG"] = options.kubeconfig  # kopf logs in through the same file
        kube = Kube(api_client_for(options.kubeconfig))
        settings = ControllerSettings(
            store_url_for_pods=options.store_url_for_pods or f"http://{options.host}:{options.port}",
            namespaces=options.namespaces,
            scan_interval_s=options.scan_interval_s,
            sweep_interval_s=options.sweep_interval_s,
            heartbeat_lease_s=options.heartbeat_lease_s,
        )
        controller = Controller(store, kube, settings)
        health = Health()
        asyncio.run(_serve(options, store, controller, health))
    finally:
        store.close()
    return 0


async def _serve(options: ControllerOptions, store: DuckDBStore, controller: Controller, health: Health) -> None:
    app = build_app(store, admin_token=options.admin_token, health=lambda: health.report(options.sweep_interval_s),
                    on_change=controller.on_run_changed)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, options.host, options.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger = log.get(component="controller")
    logger.info("controller.started", db=store.path, namespaces=list(options.namespaces) or "*",
                store_url=controller.settings.store_url_for_pods, listen=f"{options.host}:{options.port}")

    # On start, every running row is reconciled against the pods that exist, before any new work.
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
            if loop.time() >= next_sweep:
                await asyncio.to_thread(_sweep, controller, health, logger)
                next_sweep = loop.time() + options.sweep_interval_s
        except Exception as exc:  # keep scanning; the next round retries
            logger.error("controller.scan_failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=options.scan_interval_s)


async def _refresh_loop(controller: Controller, stop: asyncio.Event, logger) -> None:
    """Rebuilds the status of EvalRuns marked dirty, coalescing bursts of events."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(controller.refresh)
        except Exception as exc:
            logger.error("controller.refresh_failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.2)


def _sweep(controller: Controller, health: Health, logger) -> None:
    try:
        controller.sweep()
        health.swept()
    except Exception as exc:
        logger.error("controller.sweep_failed", error=f"{type(exc).__name__}: {exc}")
