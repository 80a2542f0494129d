"""A small typed layer over kr8s's HTTP session: plain dicts in, plain dicts out."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import kr8s
import kr8s.asyncio

Obj = dict[str, Any]


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


def _split(path: str) -> tuple[str, str, str]:
    """'/api/v1/REST' or '/apis/GROUP/VERSION/REST' -> (base, version, REST) for kr8s.call_api."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        return "/api", parts[1], "/".join(parts[2:])
    return "/apis", "/".join(parts[1:3]), "/".join(parts[3:])


class Kube:
    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> "Kube":
        return cls(await kr8s.asyncio.api(kubeconfig=kubeconfig))

    async def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", timeout: float = 30) -> Obj:
        base, version, url = _split(path)
        kwargs: dict[str, Any] = {"params": params or {}, "timeout": timeout}
        if body is not None:
            kwargs["content"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": content_type}
        try:
            async with self._api.call_api(method, version=version, base=base, url=url, **kwargs) as resp:
                return resp.json() if resp.content else {}
        except kr8s.ServerError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 404:
                raise NotFound(str(exc)) from exc
            if code == 409:
                raise Conflict(str(exc)) from exc
            raise

    @property
    def server(self) -> str:
        """The API server's URL, as this node reaches it (https://127.0.0.1:PORT locally)."""
        return self._api.auth.server

    async def server_version(self) -> str:
        return (await self._api.version()).get("gitVersion", "")

    async def get(self, path: str) -> Obj:
        return await self.request("GET", path)

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def merge_patch(self, path: str, patch: Obj) -> Obj:
        return await self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    async def delete(self, path: str, options: Obj | None = None) -> Obj:
        return await self.request("DELETE", path, body=options)

    async def list(self, path: str, **params: str) -> Obj:
        return await self.request("GET", path, params=params)

    async def watch(self, path: str, resource_version: str, timeout_seconds: int,
                    **params: str) -> AsyncIterator[tuple[str, Obj]]:
        """Yield (type, object) events until the server closes the watch. ERROR events are
        yielded too (410 Gone means: list again)."""
        base, version, url = _split(path)
        query = {**params, "watch": "true", "resourceVersion": resource_version,
                 "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        async with self._api.call_api("GET", version=version, base=base, url=url, params=query,
                                      stream=True, timeout=timeout_seconds + 30) as resp:
            async for line in resp.aiter_lines():
                if line.strip():
                    event = json.loads(line)
                    yield event["type"], event["object"]


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}" + (f"/{sub}" if sub else "")
