"""A few Kubernetes calls on plain dicts, on top of kr8s's authenticated client.

Builders produce plain dicts; this module sends them. Creating is idempotent (an existing
object of the same name is returned, not duplicated), which is what makes operator restarts at
any point safe.
"""

from __future__ import annotations

import json
from typing import Any

import kr8s
import kr8s.asyncio

# kind -> (apiVersion, plural)
RESOURCES = {
    "ConfigMap": ("v1", "configmaps"),
    "Secret": ("v1", "secrets"),  # create and delete only: the operator may not read Secrets
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Job": ("batch/v1", "jobs"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "FineTuneJob": ("finetune.ai/v1alpha1", "finetunejobs"),
    "Model": ("finetune.ai/v1alpha1", "models"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
    "NodePool": ("karpenter.sh/v1", "nodepools"),  # cluster-scoped: pass namespace None
    "TokenReview": ("authentication.k8s.io/v1", "tokenreviews"),
}


def _status_code(exc: kr8s.ServerError) -> int | None:
    return exc.response.status_code if exc.response is not None else None


class Rejected(Exception):
    """The API server refused an object the operator built (400, 403, 422: a 4xx that retrying
    cannot change), with the server's own message."""

    def __init__(self, obj: dict, exc: kr8s.ServerError) -> None:
        try:
            message = exc.response.json().get("message") or exc.response.text
        except (AttributeError, ValueError):
            message = str(exc)
        super().__init__(f"the API server refused {obj['kind']} {obj['metadata'].get('name')}: {message}")


class NotServed(Exception):
    """The API server answered 404 to a create: the resource type is not served (its CRD is not
    installed), or the namespace is gone. Never success: nothing was created."""

    def __init__(self, obj: dict) -> None:
        self.kind, self.api_version = obj["kind"], obj.get("apiVersion", "")
        super().__init__(f"the API server has no {self.api_version} {self.kind} API here (404 creating "
                         f"{self.kind} {obj['metadata'].get('name')}): is its CustomResourceDefinition installed?")


def _rejected(exc: kr8s.ServerError) -> bool:
    """A refusal of the object itself: not missing (404), not a conflict (409), not throttled (429)."""
    code = _status_code(exc)
    return code is not None and 400 <= code < 500 and code not in (404, 409, 429)


_client: kr8s.asyncio.Api | None = None


async def client() -> kr8s.asyncio.Api:
    """One authenticated client per process (kr8s.asyncio.api() re-checks the server each call)."""
    global _client
    if _client is None:
        _client = await kr8s.asyncio.api()
    return _client


async def connect(kubeconfig: str | None = None, context: str | None = None) -> kr8s.asyncio.Api:
    """The process's client, from this kubeconfig file and context (the CLI's --kubeconfig and
    --context); the defaults are kubectl's (KUBECONFIG, ~/.kube/config, its current context)."""
    global _client
    _client = await kr8s.asyncio.api(kubeconfig=kubeconfig, context=context)
    return _client


async def _call(method: str, kind: str, namespace: str | None, path: str = "", **kwargs) -> dict | None:
    version, plural = RESOURCES[kind]
    api = await client()
    url = plural + (f"/{path}" if path else "")
    try:
        async with api.call_api(method, version=version, namespace=namespace, url=url, **kwargs) as response:
            return response.json()
    except kr8s.ServerError as exc:
        if _status_code(exc) == 404:
            return None
        raise


async def get(kind: str, namespace: str | None, name: str) -> dict | None:
    return await _call("GET", kind, namespace, name)


async def exists(kind: str, namespace: str | None, name: str) -> bool | None:
    """Whether an object exists, read as metadata only; None when this operator may not look
    (403), so a missing permission never fails a user's job."""
    version, plural = RESOURCES[kind]
    api = await client()
    try:
        async with api.call_api("GET", version=version, namespace=namespace, url=f"{plural}/{name}",
                                headers={"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}):
            return True
    except kr8s.ServerError as exc:
        code = _status_code(exc)
        if code == 404:
            return False
        if code == 403:
            return None
        raise


async def list_(kind: str, namespace: str | None, selector: dict[str, str] | None = None,
                fields: dict[str, str] | None = None) -> list[dict]:
    params = {}
    if selector:
        params["labelSelector"] = ",".join(f"{k}={v}" for k, v in selector.items())
    if fields:
        params["fieldSelector"] = ",".join(f"{k}={v}" for k, v in fields.items())
    found = await _call("GET", kind, namespace, params=params)
    return (found or {}).get("items", [])


async def create(obj: dict) -> tuple[dict, bool]:
    """Create obj; if one of that name exists, return it instead. Returns (object, created).
    Raises Rejected when the API server refuses the object itself, NotServed on a 404."""
    meta = obj["metadata"]
    try:
        created = await _call("POST", obj["kind"], meta.get("namespace"), content=json.dumps(obj))
        if created is None:  # 404: _call's "not found", which for a create means nothing was made
            raise NotServed(obj)
        return created, True
    except kr8s.ServerError as exc:
        if _rejected(exc):
            raise Rejected(obj, exc) from None
        if _status_code(exc) != 409:
            raise
    existing = await get(obj["kind"], meta.get("namespace"), meta["name"])
    if existing is None:  # deleted between the two calls: let the caller retry
        raise kr8s.ServerError(f"{obj['kind']} {meta['name']} vanished after a conflict")
    return existing, False


async def create_new(obj: dict) -> bool:
    """Create obj; False if one of that name exists (409), which is not read: for kinds the
    operator may create but not get (Secrets). Raises Rejected when the API server refuses it,
    NotServed on a 404."""
    meta = obj["metadata"]
    try:
        if await _call("POST", obj["kind"], meta.get("namespace"), content=json.dumps(obj)) is None:
            raise NotServed(obj)
        return True
    except kr8s.ServerError as exc:
        if _rejected(exc):
            raise Rejected(obj, exc) from None
        if _status_code(exc) != 409:
            raise
    return False


async def dry_run(obj: dict) -> None:
    """Ask the API server whether it would create obj (validation, admission, defaults), creating
    nothing. An object of that name that exists already passes: create returns it. Raises Rejected,
    or NotServed on a 404."""
    meta = obj["metadata"]
    try:
        answer = await _call("POST", obj["kind"], meta.get("namespace"), content=json.dumps(obj), params={"dryRun": "All"})
    except kr8s.ServerError as exc:
        if _rejected(exc):
            raise Rejected(obj, exc) from None
        if _status_code(exc) != 409:
            raise
        return
    if answer is None:
        raise NotServed(obj)


async def post(kind: str, namespace: str | None, obj: dict) -> dict | None:
    """A plain POST, for virtual resources such as TokenReview."""
    return await _call("POST", kind, namespace, content=json.dumps(obj))


async def patch(kind: str, namespace: str | None, name: str, body: dict[str, Any]) -> dict | None:
    return await _call("PATCH", kind, namespace, name, content=json.dumps(body),
                       headers={"Content-Type": "application/merge-patch+json"})


async def ensure(obj: dict) -> tuple[dict, bool]:
    """Like create, but reads first: cheap to call on every resync for objects that usually exist."""
    meta = obj["metadata"]
    existing = await get(obj["kind"], meta.get("namespace"), meta["name"])
    return (existing, False) if existing is not None else await create(obj)


async def patch_status(kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict | None:
    return await _call(
        "PATCH", kind, namespace, f"{name}/status",
        content=json.dumps({"status": status}), headers={"Content-Type": "application/merge-patch+json"},
    )


async def delete(kind: str, namespace: str | None, name: str, propagation: str = "Background") -> bool:
    """Delete if present; returns whether there was something to delete."""
    gone = await _call("DELETE", kind, namespace, name, content=json.dumps({"propagationPolicy": propagation}))
    return gone is not None


async def replace(obj: dict) -> dict | None:
    """PUT obj; its metadata.resourceVersion makes this a compare-and-swap.

    Returns None when someone else changed the object first (409 Conflict)."""
    meta = obj["metadata"]
    try:
        return await _call("PUT", obj["kind"], meta.get("namespace"), meta["name"], content=json.dumps(obj))
    except kr8s.ServerError as exc:
        if _status_code(exc) == 409:
            return None
        raise
