"""The trainer's messages in the FineTuneJob's terms.

The trainer knows only its config file (finetune_trainer.config) and the paths of its pod, so it
says `dataset.path: /mnt/pvc/data/train.jsonl does not exist`. A user wrote
`spec.dataset.source: pvc://data/train.jsonl`, and that is what a condition (or a local run)
should say back. Two rewrites, both derived from what trainer_config.render produced:

- config field paths become spec field paths: the fields render moved (`dataset.path` is
  spec.dataset.source) from RENAMED, and every other path whose fields exist in the API type
  (`training.globalBatchSize`) gets `spec.` in front; paths the operator itself filled in
  (`checkpointing.keyFile`, `reporting.*`) stay as they are, since no spec field would explain
  them;
- each volume's mount path (or, for a local run, the claim's directory) becomes its URI prefix.
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from . import sources
from .api import FineTuneJob, FineTuneJobSpec
from .trainer_config import resolved_sources

# Trainer config fields that render fills from a differently named spec field.
RENAMED = {
    "dataset.path": "spec.dataset.source",
    "output.dir": "spec.output.destination",
    "baseModel.tokenFile": "spec.baseModel.credentialsSecret",
}

# A dotted camelCase field path not already inside a longer one (spec.x, a file name a.b).
_FIELD_PATH = re.compile(r"(?<![\w./-])([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)+)(?![\w-]|\.\w)")


def _in_spec(path: list[str], model: type[BaseModel] = FineTuneJobSpec) -> bool:
    """Whether a camelCase path names fields of the API type (the first field a section)."""
    fields = {info.alias or name: info for name, info in model.model_fields.items()}
    info = fields.get(path[0])
    if info is None:
        return False
    if len(path) == 1:
        return True
    inner = info.annotation
    for candidate in getattr(inner, "__args__", (inner,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and _in_spec(path[1:], candidate):
            return True
    return False


def _field(match: re.Match) -> str:
    path = match[1]
    if path in RENAMED:
        return RENAMED[path]
    return f"spec.{path}" if _in_spec(path.split(".")) else path


def uri_prefixes(job: FineTuneJob, claim_dirs: dict[str, str] | None = None) -> dict[str, str]:
    """Each volume root the trainer sees -> the URI prefix it stands for."""
    prefixes: dict[str, str] = {}
    spec_uris = {"baseModel": job.spec.base_model.source, "dataset": job.spec.dataset.source,
                 "output": job.spec.output.destination}
    for key, resolved in resolved_sources(job, claim_dirs).items():
        if resolved.root is None:
            continue
        # The path below the root is the URI's tail, so what is left of the URI is the root's
        # prefix: pvc://data for /mnt/pvc/data, the whole destination for the output's own mount.
        uri = spec_uris[key].rstrip("/")
        tail = resolved.value[len(resolved.root):].strip("/")
        if tail and uri.endswith("/" + tail):
            prefixes[resolved.root] = uri[: -len(tail) - 1]
        elif not tail:
            prefixes[resolved.root] = uri
    return prefixes


def in_spec_terms(message: str, job: FineTuneJob, claim_dirs: dict[str, str] | None = None) -> str:
    """message with trainer config paths and pod paths said as the job's spec says them."""
    try:
        prefixes = uri_prefixes(job, claim_dirs)
    except sources.UnsupportedSource:
        prefixes = {}
    # Longest root first, so /mnt/pvc/data-2 is never read as /mnt/pvc/data plus "-2".
    for root in sorted(prefixes, key=len, reverse=True):
        message = re.sub(rf"{re.escape(root.rstrip('/'))}(?![\w-]|\.\w)", lambda _m, uri=prefixes[root]: uri, message)
    return _FIELD_PATH.sub(_field, message)
