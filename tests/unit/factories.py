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
