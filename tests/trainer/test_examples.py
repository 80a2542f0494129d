"""Every manifest in examples/ runs as shipped, as far as this machine can tell without GPUs:
the operator parses it, its data is in the repository (or in the manifest), and the trainer's own
pipeline (read, tokenize, split, pack) gives at least one full step of its batch size on the
world it asks for. hf:// models bring their own tokenizer; the built-in one stands in for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.trainer_config import render
from finetune_trainer import batching, data, presets
from finetune_trainer.config import JobConfig
from kubectl_finetune import local

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _configmap_files(path: Path, into: Path) -> dict[str, Path]:
    """ConfigMaps shipped in the manifest, written out as files: name -> directory."""
    dirs = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            directory = into / doc["metadata"]["name"]
            directory.mkdir(parents=True)
            for key, value in doc["data"].items():
                (directory / key).write_text(value)
            dirs[doc["metadata"]["name"]] = directory
    return dirs


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_example_parses_and_its_data_fills_its_batches(path: Path, tmp_path: Path) -> None:
    job = local.load_job(str(path))
    claim_dirs = {"data": str(REPO / "examples" / "data"), "models": str(tmp_path / "models")}
    source = job.spec.dataset.source
    if source.startswith("configmap://"):
        name, _, key = source.removeprefix("configmap://").partition("/")
        shipped = _configmap_files(path, tmp_path / "configmaps")
        assert name in shipped, f"{path.name}: the ConfigMap {name} is not in the manifest"
        # Read it from a directory, as the pod would from the ConfigMap's mount.
        claim_dirs["shipped"] = str(shipped[name])
        raw = job.model_dump(by_alias=True, exclude_none=True, mode="json")
        raw["spec"]["dataset"]["source"] = f"pvc://shipped/{key}"
        job = type(job).model_validate(raw)
    config = JobConfig.model_validate(render(job, claim_dirs=claim_dirs, reporting={"metricsPort": 0}))
    records, fmt, _ = data.read_examples(config.dataset)
    training = config.training
    sequences = data.tokenize_all(records, fmt, presets.build_tokenizer(), training.max_seq_length)
    train, _ = data.split(sequences, config.dataset.validation_split, training.seed)
    rows = data.pack_rows(train, training.max_seq_length, training.packing, training.seed)
    world = job.spec.distributed.nodes * max(job.spec.resources.accelerators_per_node or 1, 1)
    plan = batching.StepPlan.for_rows(training, len(rows), world)
    plan.validate()  # raises "only N training row(s), fewer than globalBatchSize" as the trainer would
    assert plan.total_steps >= 2, (path.name, len(rows), plan.total_steps)
