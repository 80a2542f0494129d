"""Typed FineTuneJobs for unit tests."""

from __future__ import annotations

import copy

from finetune_operator.api import FineTuneJob

BASE = {
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 2},
    "spec": {
        "baseModel": {"source": "preset://tiny-llama"},
        "dataset": {"source": "pvc://data/sets/train.jsonl"},
        "output": {"destination": "pvc://models/demo"},
    },
}


def make_job(**spec) -> FineTuneJob:
    raw = copy.deepcopy(BASE)
    raw["spec"].update(spec)
    return FineTuneJob.model_validate(raw)


def with_status(job: FineTuneJob, status: dict) -> tuple[dict, FineTuneJob]:
    """The job as the API server would return it with this status: (raw, typed)."""
    raw = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    raw["status"] = copy.deepcopy(status)
    return raw, FineTuneJob.model_validate(raw)
