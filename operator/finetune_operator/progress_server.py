"""The progress endpoint in a process of its own (`python -m finetune_operator.progress_server`).

Why a process: the endpoint is open to the whole pod network, and whatever a flood of clients
takes from it (file descriptors, event-loop time, memory) must not be taken from the control
loop, whose Lease renewal keeps it leading. `main` starts this process, restarts it if it dies,
and closes its stdin to stop it; the process also stops when its stdin closes because the
operator died. It reads the same settings from the same environment.

Inside, three bounds (settings.progress_*): connections in all and per client (`guard`), a
request head within the keep-alive timeout (aiohttp closes a connection that has not sent one,
so a half-open connection is dropped after a few seconds), and a whole request within the
request timeout (`progress.make_app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
import threading
from collections.abc import Callable

from aiohttp import web

from .guard import ConnectionLimiter
from .progress import ProgressBuffer, make_app
from .settings import OperatorSettings, load

log = logging.getLogger("finetune_operator.progress")

READY = "ready"
# asyncio accepts up to `backlog` connections in one go before any callback runs, each holding a
# file descriptor until a refused one is closed on the next turn: so the backlog, plus the caps,
# must stay under the open-file limit.
BACKLOG = 128
SPARE_FILES = 64  # the API client's connections, logs, the interpreter's own


async def serve(settings: OperatorSettings, stop: asyncio.Event, host: str = "0.0.0.0",
                ready: Callable[[], None] | None = None) -> None:
    """Serve progress reports until `stop` is set, then write what is still buffered."""
    buffer = ProgressBuffer(interval=settings.progress_interval_seconds)
    runner = web.AppRunner(make_app(buffer, settings), access_log=None,
                           keepalive_timeout=settings.progress_header_timeout_seconds)
    await runner.setup()
    limiter = ConnectionLimiter(connection_cap(settings.progress_max_connections), settings.progress_max_connections_per_client)
    server = await asyncio.get_running_loop().create_server(
        limiter.protocol_factory(runner.server), host, settings.progress_port, backlog=BACKLOG, reuse_address=True)
    log.info("progress endpoint listening on %s:%s", host, settings.progress_port)
    if ready is not None:
        ready()
    try:
        await buffer.flush_forever(stop)
    finally:
        server.close()
        await runner.cleanup()


def connection_cap(wanted: int) -> int:
    """The connection cap this process can hold: its open-file limit, raised to the hard limit,
    less the backlog and some spare, if that is lower than the setting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = max(1, min(wanted, soft - BACKLOG - SPARE_FILES))
    if cap < wanted:
        log.warning("progress endpoint: at most %d connections, not %d: the open-file limit is %d", cap, wanted, soft)
    return cap


def _stop_when_stdin_closes(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def wait() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=wait, name="stdin-watch", daemon=True).start()


async def _main(settings: OperatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _stop_when_stdin_closes(loop, stop)
    await serve(settings, stop, ready=_say_ready)


def _say_ready() -> None:
    """One line on stdout, the operator's pipe (logs go to stderr): the port is open."""
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()


class ProgressProcess:
    """The operator's side: start the progress process, keep it running, stop it."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.ready = asyncio.Event()  # set once the first process listens

    async def run(self, stop: asyncio.Event) -> None:
        """Run the progress process until `stop`; a process that dies is started again."""
        stopping = asyncio.create_task(stop.wait())
        delay = 1.0
        try:
            while not stop.is_set():
                self.starts += 1
                started = asyncio.get_running_loop().time()
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
                asyncio.create_task(self._wait_ready(self.proc))
                exited = asyncio.create_task(self.proc.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    await self._stop(exited)
                    return
                log.error("the progress endpoint's process exited with %s; starting it again", self.proc.returncode)
                # Back off while it keeps dying at once; start over after a long run.
                delay = 1.0 if asyncio.get_running_loop().time() - started > 60 else min(30.0, delay * 2)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), timeout=delay)
        finally:
            stopping.cancel()

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        if (await proc.stdout.readline()).decode().strip() == READY:
            self.ready.set()

    async def _stop(self, exited: asyncio.Task) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()  # the process writes what it buffered and exits
        try:
            await asyncio.wait_for(exited, timeout=15)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_main(load()))


if __name__ == "__main__":
    main()
