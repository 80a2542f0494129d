"""Specs the API must reject, shared by the API-server test (CEL and schema at `kubectl apply`) and
the unit test of the same rules in Python (a local run, or the trainer reading its config)."""

from __future__ import annotations

import copy

VALID = {
    "apiVersion": "finetune.ai/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid"},
    "spec": {
        "baseModel": {"source": "preset://tiny-llama"},
        "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"destination": "pvc://models/valid"},
    },
}


def with_changes(path: str, value, name: str = "invalid") -> dict:
    """VALID with the dotted `path` set to `value` (None deletes the key)."""
    manifest = copy.deepcopy(VALID)
    manifest["metadata"]["name"] = name
    *parents, leaf = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return manifest


# (case id, dotted path, value, text the API server's error must contain)
INVALID = [
    ("weight-decay-above-one", "spec.training", {"weightDecay": 1.5}, "spec.training.weightDecay"),
    ("bad-scheduler", "spec.training", {"lrScheduler": "step"}, "spec.training.lrScheduler: Unsupported value"),
    ("missing-base-model", "spec.baseModel", None, "spec.baseModel: Required value"),
    ("missing-dataset", "spec.dataset", None, "spec.dataset: Required value"),
    ("missing-output", "spec.output", None, "spec.output: Required value"),
    ("bad-model-scheme", "spec.baseModel.source", "ftp://models/x", "spec.baseModel.source"),
    ("bad-dataset-scheme", "spec.dataset.source", "file:///etc/passwd", "spec.dataset.source"),
    ("bad-output-scheme", "spec.output.destination", "https://example.invalid/out", "spec.output.destination"),
    ("bad-method", "spec.method", {"type": "prefix-tuning"}, "spec.method.type: Unsupported value"),
    ("rank-zero", "spec.method", {"lora": {"r": 0}}, "spec.method.lora.r"),
    ("dropout-one", "spec.method", {"lora": {"dropout": 1.0}}, "spec.method.lora.dropout"),
    ("empty-targets", "spec.method", {"lora": {"targetModules": []}}, "spec.method.lora.targetModules"),
    ("negative-lr", "spec.training", {"learningRate": -0.1}, "spec.training.learningRate"),
    ("zero-epochs", "spec.training", {"epochs": 0}, "spec.training.epochs"),
    ("tiny-seq", "spec.training", {"maxSeqLength": 8}, "spec.training.maxSeqLength"),
    ("zero-stage-4", "spec.distributed", {"zeroStage": 4}, "spec.distributed.zeroStage"),
    ("bad-offload", "spec.distributed", {"offload": "disk"}, "spec.distributed.offload: Unsupported value"),
    ("param-offload-zero2", "spec.distributed", {"zeroStage": 2, "offload": "parameters"},
     "parameters offload needs zeroStage 3"),
    ("optimizer-offload-zero0", "spec.distributed", {"zeroStage": 0, "offload": "optimizer"},
     "optimizer offload needs zeroStage 1, 2 or 3"),
    ("qlora-on-cpu", "spec", {**VALID["spec"], "method": {"type": "qlora"}, "resources": {"accelerator": "none"}},
     "method.type qlora needs a GPU"),
    ("batch-not-multiple", "spec.training", {"microBatchSize": 3, "globalBatchSize": 32},
     "training.globalBatchSize must be a multiple"),
    ("batch-vs-gpus", "spec", {**VALID["spec"], "training": {"microBatchSize": 4, "globalBatchSize": 32},
                               "resources": {"acceleratorsPerNode": 3}}, "training.globalBatchSize must be a multiple"),
    ("gpu-count-zero", "spec.resources", {"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": 0},
     "resources.acceleratorsPerNode must be at least 1"),
    ("bad-accelerator", "spec.resources", {"accelerator": "gpu"}, "spec.resources.accelerator"),
    ("bad-memory", "spec.resources", {"memory": "lots"}, "spec.resources.memory"),
    ("bad-sha", "spec.dataset.sha256", "not-a-digest", "spec.dataset.sha256"),
    ("bad-split", "spec.dataset.validationSplit", 0.9, "spec.dataset.validationSplit"),
    ("bad-format", "spec.dataset.format", "csv", "spec.dataset.format: Unsupported value"),
    ("zero-nodes", "spec.distributed", {"nodes": 0}, "spec.distributed.nodes"),
    ("bad-provisioner", "spec.nodePool", {"provisioner": "magic"}, "spec.nodePool.provisioner: Unsupported value"),
    ("karpenter-with-selector", "spec.nodePool", {"provisioner": "karpenter", "nodeSelector": {"a": "b"}},
     "nodePool.nodeSelector and nodePool.tolerations apply to the existing and none provisioners"),
    ("class-ref-without-karpenter", "spec.nodePool",
     {"provisioner": "existing", "nodeClassRef": {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"}},
     "nodePool.nodeClassRef only applies to the karpenter provisioner"),
    ("unknown-field", "spec.training", {"learningrate": 0.1}, 'unknown field "spec.training.learningrate"'),
    ("negative-deadline", "spec.activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds"),
    ("bad-model-name", "spec.output", {"destination": "pvc://models/x", "modelName": "Bad_Name"}, "spec.output.modelName"),
    ("path-escape", "spec.dataset.source", "pvc://data/../secrets/x", "must not contain '..'"),
    ("long-name", "metadata.name", "x" * 51, "metadata.name must be at most 50 characters"),
    ("dotted-name", "metadata.name", "team.a-sft", "metadata.name must be a DNS label"),
    ("backoff-too-high", "spec.backoffLimit", 1000, "spec.backoffLimit"),
]

# Cases only the API server can check: rules on metadata, and string rules without a Python twin
# (the operator's source resolver rejects '..' itself, tests/unit/test_sources.py).
SERVER_ONLY = {"long-name", "dotted-name", "path-escape"}
