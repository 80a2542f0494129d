"""Where a spec's URIs live inside the trainer pod.

`pvc://CLAIM/PATH` and `configmap://NAME/KEY` become volumes: inputs mount their whole claim or
ConfigMap read-only at /mnt/pvc/CLAIM or /mnt/configmap/NAME; the output mounts only its own
directory of the claim (a `subPath`), read-write, at /mnt/output, so a trainer can write its
destination and nothing else of the claim (the kubelet creates a missing subPath, and refuses one
that is, or passes through, a symlink leading out of the volume). Paths are normalised and
confined to the mount, so a spec can never point the trainer outside its volume; the trainer
also refuses input files whose symlinks resolve outside their mount (`Resolved.root`, passed to
it as `volumeRoot`). Presets and the hub are passed to the trainer as they are; other schemes are
refused (at `kubectl apply`, by the CRD: `SCHEMES`) until a fetcher exists for them.

Destinations are exclusive (docs/outputs.md): `destination_key` and `overlaps` say when two
destinations share files, one being the other or inside it.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass

PVC_ROOT = "/mnt/pvc"
CONFIGMAP_ROOT = "/mnt/configmap"
OUTPUT_ROOT = "/mnt/output"  # the output destination's own directory (a subPath of its claim)

_URI = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<rest>.+)$")

# The schemes `resolve` can hand to the trainer, by field: the CRD accepts these and no others
# (finetune_operator.api), so a scheme without a transport is refused at `kubectl apply`.
SCHEMES = {
    "baseModel.source": ("hf", "pvc", "preset"),
    "dataset.source": ("pvc", "configmap"),
    "output.destination": ("pvc",),
}
# Named in the spec's descriptions and the CRD's messages, so nobody waits for a job to find out.
NOT_YET = "s3://, oci:// and https://"


class UnsupportedSource(ValueError):
    """A source the operator cannot hand to the trainer (yet, or at all)."""


def volume_name(prefix: str, name: str) -> str:
    """The pod volume for a claim or ConfigMap. A volume's name is a DNS label (no dots, at most 63
    characters) while a claim's or ConfigMap's is a DNS subdomain (dots, up to 253): a name that is
    a label already is kept readable; any other gets a stem of it and a digest of the whole, so two
    sources never share a volume (cutting at 63 characters alone could merge two)."""
    plain = f"{prefix}-{name}"
    if len(plain) <= 63 and "." not in name:
        return plain
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", name)[: 63 - len(prefix) - len(digest) - 2].strip("-")
    return "-".join(filter(None, (prefix, stem, digest)))


@dataclass(frozen=True)
class Mount:
    volume_name: str
    mount_path: str
    read_only: bool
    claim: str | None = None  # persistentVolumeClaim
    config_map: str | None = None  # configMap
    sub_path: str = ""  # mount only this directory of the volume ("" : all of it)

    def volume(self) -> dict:
        if self.claim:
            return {"name": self.volume_name, "persistentVolumeClaim": {"claimName": self.claim}}
        return {"name": self.volume_name, "configMap": {"name": self.config_map}}

    def volume_mount(self) -> dict:
        mount = {"name": self.volume_name, "mountPath": self.mount_path, "readOnly": self.read_only}
        if self.sub_path:
            mount["subPath"] = self.sub_path
        return mount


@dataclass(frozen=True)
class Resolved:
    """A URI as the trainer sees it: a local path (with the mount that provides it) or a URI."""

    value: str
    mount: Mount | None = None
    # The directory `value` must stay inside once symlinks are resolved (its mount, or for a local
    # run the claim's directory); None for URIs the trainer fetches itself (preset://, hf://).
    root: str | None = None


def split(uri: str) -> tuple[str, str]:
    match = _URI.match(uri)
    if not match:
        raise UnsupportedSource(f"{uri!r} is not a URI of the form scheme://path")
    return match["scheme"], match["rest"]


def confined_path(rest: str, field: str) -> tuple[str, str]:
    """Split NAME/PATH and normalise PATH so it cannot leave the volume."""
    name, _, path = rest.partition("/")
    if not name:
        raise UnsupportedSource(f"{field}: missing the volume name in {rest!r}")
    normalised = posixpath.normpath("/" + path).lstrip("/") if path else ""
    if any(part == ".." for part in path.split("/")):
        raise UnsupportedSource(f"{field}: path {path!r} must not contain '..'")
    return name, normalised


def resolve(uri: str, field: str, *, writable: bool = False, claim_dirs: dict[str, str] | None = None) -> Resolved:
    """Resolve for a trainer pod, or, with `claim_dirs` (claim -> local directory), for a local run."""
    scheme, rest = split(uri)
    if scheme == "pvc":
        claim, path = confined_path(rest, field)
        if claim_dirs is not None:
            if claim not in claim_dirs:
                raise UnsupportedSource(f"{field}: no local directory for claim {claim!r}; pass --volume {claim}=DIR")
            root = claim_dirs[claim]
            return Resolved(posixpath.join(root, path) if path else root, root=root)
        if writable:
            # Only the destination's own directory is mounted, read-write.
            mount = Mount(volume_name("pvc", claim), OUTPUT_ROOT, read_only=False, claim=claim, sub_path=path)
            return Resolved(OUTPUT_ROOT, mount, root=OUTPUT_ROOT)
        mount = Mount(volume_name("pvc", claim), f"{PVC_ROOT}/{claim}", read_only=True, claim=claim)
        return Resolved(posixpath.join(mount.mount_path, path) if path else mount.mount_path, mount, root=mount.mount_path)
    if scheme == "configmap" and claim_dirs is not None:
        raise UnsupportedSource(f"{field}: configmap:// needs a cluster; for a local run put the file on a --volume")
    if scheme == "configmap":
        name, key = confined_path(rest, field)
        if not key or "/" in key:
            raise UnsupportedSource(f"{field}: configmap:// needs NAME/KEY, got {uri!r}")
        mount = Mount(volume_name("cm", name), f"{CONFIGMAP_ROOT}/{name}", read_only=True, config_map=name)
        return Resolved(f"{mount.mount_path}/{key}", mount, root=mount.mount_path)
    if scheme in ("preset", "hf") and not writable:
        return Resolved(uri)
    raise UnsupportedSource(f"{field}: {scheme}:// is not supported by this operator version; use "
                            + " or ".join(f"{s}://" for s in SCHEMES.get(field, ("pvc",))))


def merge_mounts(*resolved: Resolved) -> list[Mount]:
    """Each mount once (two inputs on one claim share its read-only mount). The output's subPath
    mount is its own even when an input reads the same claim: one volume, two mounts."""
    seen: dict[tuple[str, str], Mount] = {}
    for item in resolved:
        if item.mount is not None:
            seen.setdefault((item.mount.volume_name, item.mount.mount_path), item.mount)
    return list(seen.values())


def volumes_of(mounts: list[Mount]) -> list[dict]:
    """The pod volumes behind the mounts, one per claim or ConfigMap."""
    by_name: dict[str, dict] = {}
    for mount in mounts:
        by_name.setdefault(mount.volume_name, mount.volume())
    return list(by_name.values())


def destination_key(uri: str) -> tuple[str, ...] | None:
    """A destination as comparable parts: (scheme, claim or bucket, path segments...), with the
    path normalised as the trainer's mount sees it. None for a URI that is not one."""
    try:
        scheme, rest = split(uri)
    except UnsupportedSource:
        return None
    name, _, path = rest.partition("/")
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p] if path else []
    return (scheme, name, *parts)


def overlaps(a: str, b: str) -> bool:
    """Whether two destinations share files: the same directory, or one inside the other."""
    ka, kb = destination_key(a), destination_key(b)
    if ka is None or kb is None:
        return a == b
    shorter = min(len(ka), len(kb))
    return ka[:shorter] == kb[:shorter]
