"""Entry point: `finetune-operator` (or `python -m finetune_operator`).

Reads and validates the settings once (a bad value exits at once, with one line naming it),
serves health and Prometheus metrics, starts the progress endpoint's own process
(`progress_server`), waits to become leader, then runs Kopf with the handlers in `handlers`, the
settings and the per-job state in its memo. Exits non-zero if leadership is lost, so the pod
restarts as a candidate instead of acting alongside the new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid

import kopf
import prometheus_client
from aiohttp import web

from . import handlers, login  # noqa: F401  (registers the handlers and the login)
from .leader import LeaseElector
from .progress_server import ProgressProcess
from .settings import OperatorSettings, load

log = logging.getLogger("finetune_operator")


async def serve_health(port: int) -> web.AppRunner:
    """Liveness and readiness for every replica, leader or standby: a standby waiting for the
    Lease is healthy, and must not be restarted for not leading."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def run(settings: OperatorSettings) -> int:
    identity = settings.identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    elector = LeaseElector(settings.lease_name, settings.lease_namespace, identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health = await serve_health(settings.health_port)
    prometheus_client.start_http_server(settings.metrics_port)
    # Every replica accepts verified progress reports and writes them: that is not a
    # reconciliation decision, so it needs no leadership, and trainers never hit a standby in vain.
    # The endpoint runs in its own process, so a flood of clients cannot starve this one.
    progress_process = ProgressProcess()
    progress = asyncio.create_task(progress_process.run(stop))
    # Trainers report as soon as their pods run, so the endpoint listens before this replica
    # can lead (and create pods); a process that cannot start shows in its own log lines.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(progress_process.ready.wait(), timeout=60)
    acquiring = asyncio.create_task(elector.acquire())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        acquiring.cancel()
        await progress
        await health.cleanup()
        return 0
    stopping.cancel()

    keeper = asyncio.create_task(elector.keep(stop))
    namespaces = settings.watched_namespaces
    handlers.register_resync(settings.resync_seconds)
    try:
        await kopf.operator(
            standalone=True,  # leader election above replaces Kopf's peering
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop,
            memo=handlers.make_memo(settings),
        )
    finally:
        stop.set()
        await keeper
        if not elector.lost.is_set():
            await elector.release()
        await progress
        await health.cleanup()
    return 1 if elector.lost.is_set() else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the log
    settings = load()  # once, before anything starts: bad settings exit here, with one line
    sys.exit(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
