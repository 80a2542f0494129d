"""Pod volumes materialised as host directories under the pod's state directory."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable

from process_node.config import Config
from process_node.envvars import Fetch

Obj = dict[str, Any]
ClaimDir = Callable[[str], Awaitable[Path]]
log = logging.getLogger(__name__)


class VolumeError(Exception):
    """A volume cannot be set up yet (e.g. its ConfigMap is missing); retried like the kubelet."""


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


async def materialise(volumes: list[Obj], volumes_dir: Path, fetch: Fetch, claim_dir: ClaimDir) -> dict[str, Path]:
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
            log.info("volume %s: projected volumes (service-account tokens) are not supported; skipped", name)
            continue
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
