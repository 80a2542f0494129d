"""Pod volumes materialised as host directories under the pod's state directory."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable

from process_node.config import Config
from process_node.envvars import EnvError, Fetch, field_ref

Obj = dict[str, Any]
ClaimDir = Callable[[str], Awaitable[Path]]
# (audience or None, expirationSeconds) -> a bound service-account token from the TokenRequest API
TokenFn = Callable[[str | None, int], Awaitable[str]]
DEFAULT_TOKEN_SECONDS = 3600   # the kubelet's default expirationSeconds for a projected token
log = logging.getLogger(__name__)


class VolumeError(Exception):
    """A volume cannot be set up yet (e.g. its ConfigMap is missing); retried like the kubelet."""


def sub_path(volume_dir: Path, sub: str) -> Path:
    """The host directory a volumeMount's subPath names, created if missing, as the kubelet does:
    never outside the volume. The API server already refuses an absolute subPath or one with
    '..'; a symlink inside the volume could still lead out (to the node's files), so every
    component is resolved and must stay in the volume, and missing ones are created one at a
    time (mkdir never follows a link). The kubelet refuses such a subPath and retries (the
    container waits in CreateContainerConfigError); so does this node (VolumeError). Returns the
    resolved directory, which is what gets mounted."""
    parts = [p for p in sub.split("/") if p not in ("", ".")]
    if sub.startswith("/") or ".." in parts:
        raise ValueError(f"subPath {sub!r} must be a relative path without '..'")
    root = volume_dir.resolve()
    current = root
    for part in parts:
        candidate = current / part
        if not candidate.is_symlink() and not candidate.exists():
            try:
                candidate.mkdir()
            except FileExistsError:  # made meanwhile: resolved below like any other
                pass
        resolved = candidate.resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise VolumeError(f"subPath {sub!r}: {candidate} leads outside the volume (to {resolved})")
        current = resolved
    return current


def _write_files(root: Path, data: dict[str, bytes], source: Obj, default_mode: int) -> None:
    """Write keys as files, honouring items (key -> path, mode) and defaultMode."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    mode_default = source.get("defaultMode", default_mode)
    items = source.get("items")
    wanted = [(i["key"], i["path"], i.get("mode", mode_default)) for i in items] if items \
        else [(k, k, mode_default) for k in data]
    for key, rel, mode in wanted:
        if key not in data:
            if source.get("optional"):
                continue
            raise VolumeError(f"key {key!r} not found")
        target = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise VolumeError(f"bad item path {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[key])
        os.chmod(target, mode)


def _config_map_data(obj: Obj) -> dict[str, bytes]:
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _secret_data(obj: Obj) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _atomic_write(target: Path, data: bytes, mode: int) -> None:
    """Replace a file in one step, so a reader never sees half a token (refreshes included)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def _downward_items(pod: Obj, items: list[Obj], node_ip: str) -> dict[str, bytes]:
    data = {}
    for item in items:
        if "fieldRef" not in item:
            raise ValueError(f"downwardAPI item {item.get('path')!r}: only fieldRef is supported")
        try:
            data[item["path"]] = field_ref(pod, item["fieldRef"]["fieldPath"], node_ip).encode()
        except EnvError as exc:
            raise ValueError(f"downwardAPI item {item.get('path')!r}: {exc}") from exc
    return data


async def write_tokens(root: Path, sources: list[Obj], token: TokenFn | None, mode: int) -> float | None:
    """(Re)write the serviceAccountToken files of a projected volume; return the shortest
    expiry in seconds, or None if it has no token. The kubelet refreshes at 80% of it."""
    shortest: float | None = None
    for source in sources:
        spec = source.get("serviceAccountToken")
        if spec is None:
            continue
        if token is None:
            raise ValueError("serviceAccountToken projections need the node's API access")
        seconds = int(spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS)
        value = await token(spec.get("audience") or None, seconds)
        _atomic_write(root / spec["path"], value.encode(), mode)
        shortest = seconds if shortest is None else min(shortest, seconds)
    return shortest


async def _projected(root: Path, projected: Obj, fetch: Fetch, token: TokenFn | None, pod: Obj,
                     node_ip: str) -> None:
    """A projected volume: service-account token (TokenRequest), configMap, secret and
    downwardAPI sources, all in one directory (kubelet: the kube-api-access-* volume)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    mode = projected.get("defaultMode", 0o644)
    for source in projected.get("sources") or []:
        if "configMap" in source or "secret" in source:
            kind = "ConfigMap" if "configMap" in source else "Secret"
            spec = source.get("configMap") or source.get("secret") or {}
            obj = await fetch(kind, spec["name"])
            if obj is None:
                if spec.get("optional"):
                    continue
                raise VolumeError(f'{kind} "{spec["name"]}" not found')
            data = (_config_map_data if kind == "ConfigMap" else _secret_data)(obj)
            items = spec.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    if spec.get("optional"):
                        continue
                    raise VolumeError(f'{kind} "{spec["name"]}": key {item["key"]!r} not found')
                _atomic_write(root / item["path"], data[item["key"]], item.get("mode", mode))
        elif "downwardAPI" in source:
            for rel, value in _downward_items(pod, source["downwardAPI"].get("items") or [], node_ip).items():
                _atomic_write(root / rel, value, mode)
        elif "serviceAccountToken" in source:
            pass   # below, through write_tokens (also used to refresh)
        else:
            raise ValueError(f"unsupported projected source {sorted(source)}")
    await write_tokens(root, projected.get("sources") or [], token, mode)


async def materialise(volumes: list[Obj], volumes_dir: Path, fetch: Fetch, claim_dir: ClaimDir,
                      token: TokenFn | None = None, pod: Obj | None = None,
                      node_ip: str = "127.0.0.1") -> dict[str, Path]:
    """Return volume name -> host path for every volume the process node supports."""
    paths: dict[str, Path] = {}
    for volume in volumes:
        name = volume["name"]
        here = volumes_dir / name
        if "configMap" in volume or "secret" in volume:
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            source = volume.get("configMap") or volume.get("secret") or {}
            obj_name = source.get("name") if kind == "ConfigMap" else source.get("secretName")
            obj = await fetch(kind, obj_name)
            if obj is None and not source.get("optional"):
                raise VolumeError(f'volume {name}: {kind} "{obj_name}" not found')
            data = (_config_map_data if kind == "ConfigMap" else _secret_data)(obj or {})
            try:
                _write_files(here, data, source, 0o644 if kind == "ConfigMap" else 0o400)
            except VolumeError as exc:
                raise VolumeError(f"volume {name}: {kind} {obj_name}: {exc}") from exc
        elif "emptyDir" in volume:
            here.mkdir(parents=True, exist_ok=True)
            os.chmod(here, 0o777)
        elif "persistentVolumeClaim" in volume:
            here = await claim_dir(volume["persistentVolumeClaim"]["claimName"])
            here.mkdir(parents=True, exist_ok=True)
        elif "projected" in volume:
            try:
                await _projected(here, volume["projected"], fetch, token, pod or {}, node_ip)
            except VolumeError as exc:
                raise VolumeError(f"volume {name}: {exc}") from exc
            except ValueError as exc:
                raise ValueError(f"volume {name}: {exc}") from exc
        elif "downwardAPI" in volume:
            if here.exists():
                shutil.rmtree(here)
            here.mkdir(parents=True)
            mode = volume["downwardAPI"].get("defaultMode", 0o644)
            for rel, value in _downward_items(pod or {}, volume["downwardAPI"].get("items") or [], node_ip).items():
                _atomic_write(here / rel, value, mode)
        elif "hostPath" in volume:
            here = Path(volume["hostPath"]["path"])
        else:
            raise ValueError(f"volume {name}: unsupported volume type {sorted(k for k in volume if k != 'name')}")
        paths[name] = here
    return paths


async def claim_host_dir(config: Config, get: Callable[[str], Awaitable[Obj | None]], namespace: str, claim: str) -> Path:
    """Where a PVC lives on this host: --volume CLAIM=DIR, else the hostPath/local path of the
    PersistentVolume it is bound to, else <volumes-root>/<claim>."""
    if claim in config.claim_dirs:
        return config.claim_dirs[claim]
    pvc = await get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    volume_name = ((pvc or {}).get("spec") or {}).get("volumeName")
    if volume_name:
        pv = await get(f"/api/v1/persistentvolumes/{volume_name}") or {}
        spec = pv.get("spec") or {}
        for kind in ("hostPath", "local"):
            if spec.get(kind, {}).get("path"):
                return Path(spec[kind]["path"])
    return config.claim_dir(claim)
