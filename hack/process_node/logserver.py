"""`kubectl logs` for this node: the kubelet's /containerLogs endpoint on 127.0.0.1.

The apiserver proxies `kubectl logs` to https://<InternalIP>:<kubeletEndpoint port>/containerLogs/
NS/POD/CONTAINER. InternalIP is loopback, so this is served on 127.0.0.1 only, over TLS with a
self-signed certificate (the apiserver does not verify kubelet serving certificates unless
--kubelet-certificate-authority is set; the local cluster does not set it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Callable

from aiohttp import web

log = logging.getLogger(__name__)
FOLLOW_POLL_SECONDS = 0.5


def _certificate(state_dir: Path, node_ip: str) -> ssl.SSLContext | None:
    cert, key = state_dir / "kubelet.crt", state_dir / "kubelet.key"
    if not cert.exists():
        if not shutil.which("openssl"):
            log.warning("openssl not found: kubectl logs is not served (read the log files instead)")
            return None
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                        "-subj", "/CN=process-node", "-addext", f"subjectAltName=IP:{node_ip}",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class LogServer:
    """Serves container logs; `log_path(ns, pod, container)` finds the file and
    `running(ns, pod)` says whether `follow` should keep waiting for more."""

    def __init__(self, log_path: Callable[[str, str, str], Path | None], running: Callable[[str, str], bool]) -> None:
        self.log_path, self.running = log_path, running
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, state_dir: Path, host: str) -> int:
        context = _certificate(state_dir, host)
        if context is None:
            return 0
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("serving container logs on https://%s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        path = self.log_path(ns, pod, container)
        if path is None or not path.exists():
            raise web.HTTPNotFound(text=f"no logs for container {container} of pod {ns}/{pod} on this node\n")
        query = request.query
        tail_lines = int(query["tailLines"]) if query.get("tailLines") else None
        limit = int(query["limitBytes"]) if query.get("limitBytes") else None
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        data = path.read_bytes()
        offset = len(data)
        if tail_lines is not None:
            data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines > 0 else b""
        sent = 0

        async def send(chunk: bytes) -> bool:
            nonlocal sent
            if limit is not None:
                chunk = chunk[:max(limit - sent, 0)]
            sent += len(chunk)
            if chunk:
                await response.write(chunk)
            return limit is None or sent < limit

        more = await send(data)
        if query.get("follow") in ("true", "1"):
            while more:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                more = await send(chunk)
                if not chunk:
                    if not self.running(ns, pod):
                        break
                    await asyncio.sleep(FOLLOW_POLL_SECONDS)
        await response.write_eof()
        return response
