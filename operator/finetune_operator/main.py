"""Entry point: `finetune-operator` (or `python -m finetune_operator`).

Waits to become leader, then runs Kopf with the handlers in `handlers`, serving Prometheus
metrics and a liveness endpoint. Exits non-zero if leadership is lost, so the pod restarts as a
candidate instead of acting alongside the new leader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import uuid

import kopf
import prometheus_client

from . import handlers  # noqa: F401  (registers the handlers)
from .leader import LeaseElector
from .settings import OperatorSettings

log = logging.getLogger("finetune_operator")


async def run(settings: OperatorSettings) -> int:
    identity = settings.identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    elector = LeaseElector(settings.lease_name, settings.lease_namespace, identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    acquiring = asyncio.create_task(elector.acquire())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        acquiring.cancel()
        return 0
    stopping.cancel()

    prometheus_client.start_http_server(settings.metrics_port)
    keeper = asyncio.create_task(elector.keep(stop))
    namespaces = settings.watched_namespaces
    try:
        await kopf.operator(
            standalone=True,  # leader election above replaces Kopf's peering
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
        )
    finally:
        stop.set()
        await keeper
        if not elector.lost.is_set():
            await elector.release()
    return 1 if elector.lost.is_set() else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(run(OperatorSettings())))


if __name__ == "__main__":
    main()
