"""Container environment: env entries resolved like the kubelet, and $(VAR) expansion."""

from __future__ import annotations

import base64
import re
from typing import Any, Awaitable, Callable

Obj = dict[str, Any]
Fetch = Callable[[str, str], Awaitable[Obj | None]]  # (kind, name) -> ConfigMap/Secret or None


class EnvError(Exception):
    """The environment cannot be built yet (e.g. a missing ConfigMap); the kubelet retries."""


_SUBSCRIPT = re.compile(r"^metadata\.(annotations|labels)\['(.+)'\]$")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def field_ref(pod: Obj, path: str, pod_ip: str) -> str:
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.hostIP": pod_ip,
    }
    if path in simple:
        return simple[path]
    match = _SUBSCRIPT.match(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    raise EnvError(f"unsupported fieldRef {path!r}")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones left as written,
    and $$ escapes a dollar."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REFERENCE.sub(sub, text)


async def _key_ref(kind: str, ref: Obj, fetch: Fetch) -> str | None:
    obj = await fetch(kind, ref["name"])
    optional = bool(ref.get("optional"))
    if obj is None:
        if optional:
            return None
        raise EnvError(f'{kind} "{ref["name"]}" not found')
    if kind == "Secret":
        value = (obj.get("data") or {}).get(ref["key"])
        value = base64.b64decode(value).decode() if value is not None else None
    else:
        value = (obj.get("data") or {}).get(ref["key"])
    if value is None and not optional:
        raise EnvError(f'couldn\'t find key {ref["key"]} in {kind} {ref["name"]}')
    return value


async def resolve(pod: Obj, container: Obj, fetch: Fetch, pod_ip: str) -> dict[str, str]:
    """The container's env entries (envFrom, then env in order, each able to use earlier ones)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        obj = await fetch(kind, ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise EnvError(f'{kind} "{ref["name"]}" not found')
        for key, value in (obj.get("data") or {}).items():
            env[source.get("prefix", "") + key] = base64.b64decode(value).decode() if kind == "Secret" else value
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = field_ref(pod, source["fieldRef"]["fieldPath"], pod_ip)
        elif "configMapKeyRef" in source:
            value = await _key_ref("ConfigMap", source["configMapKeyRef"], fetch)
        elif "secretKeyRef" in source:
            value = await _key_ref("Secret", source["secretKeyRef"], fetch)
        else:
            raise EnvError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Obj, env: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expanded. No image, so no entrypoint to fall back on."""
    command = list(container.get("command") or [])
    if not command:
        raise ValueError("the container has no command: a process node runs only explicit commands (no image entrypoint)")
    return [expand(part, env) for part in command + list(container.get("args") or [])]
