"""Specs the API must reject (and a few it must accept), shared by the API-server test (CEL and schema at `kubectl apply`) and
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


def existing(**fields) -> dict:
    """A nodePool on existing nodes (where nodeSelector and tolerations apply) with `fields`."""
    return {"provisioner": "existing", **fields}


# The messages of the rules, as both validators say them (finetune_operator.api).
QUANTITY = "must be a positive quantity"
LABEL_VALUE = "must be a label value"
LABEL_KEY = "must be a label key"
LABEL_KEYS = "keys must be label keys"
RESERVED = "must not be reserved for the operator's and other tenants' dedicated nodes"
NEEDS_KEY = "a toleration needs a key"


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
    # Schemes without a transport in this version: refused at apply time, saying so.
    ("dataset-s3-not-yet", "spec.dataset.source", "s3://bucket/train.jsonl", "are not supported by this operator version yet"),
    ("dataset-hf-not-yet", "spec.dataset.source", "hf://org/data", "must be a pvc:// or configmap:// URI"),
    ("dataset-https-not-yet", "spec.dataset.source", "https://example.com/train.jsonl", "spec.dataset.source"),
    ("model-oci-not-yet", "spec.baseModel.source", "oci://registry/repo:tag", "must be a hf:// or pvc:// or preset:// URI"),
    ("output-s3-not-yet", "spec.output.destination", "s3://bucket/out", "must be a pvc:// URI"),
    ("global-batch-word", "spec.training", {"globalBatchSize": "big"}, "must be an integer from 1 to 1048576, or auto"),
    ("global-batch-zero", "spec.training", {"globalBatchSize": 0}, "must be an integer from 1 to 1048576, or auto"),
    # Trainer pod settings cannot change what the operator sets or selects on.
    ("pod-env-reserved", "spec.trainerPod", {"env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0,1"}]}, "is set by the operator"),
    ("pod-env-prefix", "spec.trainerPod", {"env": [{"name": "FINETUNE_X", "value": "1"}]}, "is set by the operator"),
    ("pod-env-name", "spec.trainerPod", {"env": [{"name": "1BAD", "value": "1"}]}, "spec.trainerPod.env[0].name"),
    ("pod-env-twice", "spec.trainerPod", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
     "env names must be unique"),
    ("pod-label-operator-key", "spec.trainerPod", {"labels": {"app.kubernetes.io/component": "x"}}, "the operator's own prefixes"),
    ("pod-annotation-operator-key", "spec.trainerPod", {"annotations": {"karpenter.sh/do-not-disrupt": "false"}},
     "the operator's own prefixes"),
    ("pod-label-value", "spec.trainerPod", {"labels": {"team": "a b"}}, "must be a label value"),
    ("pod-priority-class", "spec.trainerPod", {"priorityClassName": "High"}, "spec.trainerPod.priorityClassName"),
    ("bad-method", "spec.method", {"type": "prefix-tuning"}, "spec.method.type: Unsupported value"),
    ("rank-zero", "spec.method", {"lora": {"r": 0}}, "spec.method.lora.r"),
    ("dropout-one", "spec.method", {"lora": {"dropout": 1.0}}, "spec.method.lora.dropout"),
    ("empty-targets", "spec.method", {"lora": {"targetModules": []}}, "spec.method.lora.targetModules"),
    ("negative-lr", "spec.training", {"learningRate": -0.1}, "spec.training.learningRate"),
    ("zero-epochs", "spec.training", {"epochs": 0}, "must be an integer from 1 to 1000, or auto"),
    ("epochs-word", "spec.training", {"epochs": "many"}, "must be an integer from 1 to 1000, or auto"),
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
    # Names the children are made of: DNS subdomains, not just their alphabet.
    ("model-name-empty-label", "spec.output.modelName", "a..b", "spec.output.modelName"),
    ("secret-name-empty-label", "spec.dataset.credentialsSecret", "a..b", "spec.dataset.credentialsSecret"),
    # Quantities as the API server reads them (CEL isQuantity): suffixes are case-sensitive.
    ("memory-lowercase-mi", "spec.resources", {"memory": "512mi"}, QUANTITY),
    ("memory-with-space", "spec.resources", {"memory": "1 Gi"}, QUANTITY),
    ("memory-zero", "spec.resources", {"memory": "0"}, QUANTITY),
    ("memory-exponent-overflow", "spec.resources", {"memory": "1e99999999999999999999"}, QUANTITY),
    ("cpu-junk", "spec.resources", {"cpu": "lots"}, QUANTITY),
    ("cpu-negative", "spec.resources", {"cpu": "-1"}, QUANTITY),
    ("cpu-hex", "spec.resources", {"cpu": "0x10"}, QUANTITY),
    # The instance type is a node label's value (node.kubernetes.io/instance-type).
    ("instance-type-space", "spec.resources", {"instanceType": "g5 xlarge"}, LABEL_VALUE),
    ("instance-type-empty", "spec.resources", {"instanceType": ""}, "spec.resources.instanceType"),
    ("instance-type-too-long", "spec.resources", {"instanceType": "g" * 64}, "spec.resources.instanceType"),
    # nodeSelector: label keys and values, and no reserved keys.
    ("selector-value-space", "spec.nodePool", existing(nodeSelector={"team": "research lab"}), LABEL_VALUE),
    ("selector-value-nbsp", "spec.nodePool", existing(nodeSelector={"team": "research\u00a0lab"}), LABEL_VALUE),
    ("selector-value-leading-dash", "spec.nodePool", existing(nodeSelector={"team": "-a"}), LABEL_VALUE),
    ("selector-value-too-long", "spec.nodePool", existing(nodeSelector={"team": "a" * 64}), "spec.nodePool.nodeSelector"),
    ("selector-key-junk", "spec.nodePool", existing(nodeSelector={"bad key!": "x"}), LABEL_KEYS),
    ("selector-key-long-name", "spec.nodePool", existing(nodeSelector={"example.com/" + "a" * 64: "x"}), LABEL_KEYS),
    ("selector-key-long-prefix", "spec.nodePool", existing(nodeSelector={"a" * 254 + "/x": "x"}), LABEL_KEYS),
    ("selector-key-uppercase-prefix", "spec.nodePool", existing(nodeSelector={"Example.com/x": "x"}), LABEL_KEYS),
    ("selector-key-two-slashes", "spec.nodePool", existing(nodeSelector={"a/b/c": "x"}), LABEL_KEYS),
    ("selector-reserved-job-uid", "spec.nodePool", existing(nodeSelector={"finetune.ai/job-uid": "0f1e"}), RESERVED),
    ("selector-reserved-finetune-any", "spec.nodePool", existing(nodeSelector={"finetune.ai/anything": "x"}), RESERVED),
    ("selector-reserved-nodepool", "spec.nodePool", existing(nodeSelector={"karpenter.sh/nodepool": "finetune-0f1e"}), RESERVED),
    ("selector-reserved-node-role", "spec.nodePool", existing(nodeSelector={"node-role.kubernetes.io/control-plane": ""}),
     RESERVED),
    # tolerations: the core API's rules, plus a required, unreserved key.
    ("toleration-exists-with-value", "spec.nodePool", existing(tolerations=[
        {"key": "gpu", "operator": "Exists", "value": "v", "effect": "NoSchedule"}]), "value must be empty when operator is Exists"),
    ("toleration-empty-key-exists", "spec.nodePool", existing(tolerations=[{"operator": "Exists"}]), NEEDS_KEY),
    ("toleration-blank-key-exists", "spec.nodePool", existing(tolerations=[{"key": "", "operator": "Exists"}]), LABEL_KEY),
    ("toleration-empty-key-equal", "spec.nodePool", existing(tolerations=[{"operator": "Equal", "value": "x"}]), NEEDS_KEY),
    ("toleration-bad-effect", "spec.nodePool", existing(tolerations=[{"key": "gpu", "effect": "NoRun"}]),
     "spec.nodePool.tolerations[0].effect: Unsupported value"),
    ("toleration-bad-operator", "spec.nodePool", existing(tolerations=[{"key": "gpu", "operator": "In"}]),
     "spec.nodePool.tolerations[0].operator: Unsupported value"),
    ("toleration-bad-key", "spec.nodePool", existing(tolerations=[{"key": "bad key", "operator": "Exists"}]), LABEL_KEY),
    ("toleration-value-space", "spec.nodePool", existing(tolerations=[{"key": "gpu", "operator": "Equal", "value": "a b"}]),
     LABEL_VALUE),
    ("toleration-seconds-without-noexecute", "spec.nodePool", existing(tolerations=[
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]),
     "tolerationSeconds applies only to effect NoExecute"),
    ("toleration-reserved-job", "spec.nodePool", existing(tolerations=[{"key": "finetune.ai/job", "operator": "Exists"}]), RESERVED),
    ("toleration-reserved-node-role", "spec.nodePool", existing(tolerations=[
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]), RESERVED),
    ("toleration-reserved-nodepool", "spec.nodePool", existing(tolerations=[
        {"key": "karpenter.sh/nodepool", "operator": "Exists"}]), RESERVED),
    # One regex dialect: whitespace of any alphabet, and anything outside printable ASCII, is refused
    # by both validators alike (Go's \s and Rust's \s disagreed on U+00A0).
    ("dataset-path-nbsp", "spec.dataset.source", "pvc://data/sub\u00a0dir/train.jsonl", "spec.dataset.source"),
    ("output-path-ideographic-space", "spec.output.destination", "pvc://models/a\u3000b", "spec.output.destination"),
    ("model-source-tab", "spec.baseModel.source", "hf://org/na\tme", "spec.baseModel.source"),
    ("dataset-path-em-space", "spec.dataset.source", "pvc://data/a\u2003b.jsonl", "spec.dataset.source"),
    ("dataset-path-non-ascii", "spec.dataset.source", "pvc://data/donn\u00e9es.jsonl", "spec.dataset.source"),
]

# Specs both validators accept: the rules above refuse only what they must.
ACCEPTED = [
    ("global-batch-auto", "spec.training", {"globalBatchSize": "auto", "microBatchSize": 3}),
    ("global-batch-number", "spec.training", {"globalBatchSize": 12, "microBatchSize": 3}),
    ("epochs-auto", "spec.training", {"epochs": "auto"}),
    ("epochs-number", "spec.training", {"epochs": 7}),
    ("pod-settings", "spec.trainerPod", {
        "serviceAccountName": "trainer", "priorityClassName": "gpu-high", "imagePullSecrets": ["regcred"],
        "labels": {"team": "a", "sidecar.istio.io/inject": "false"}, "annotations": {"example.com/note": "a b: c"},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "HF_ENDPOINT", "value": "https://hub.example"}]}),
    ("memory-binary", "spec.resources", {"memory": "512Mi"}),
    ("memory-fraction", "spec.resources", {"memory": "1.5Gi"}),
    ("memory-exponent", "spec.resources", {"memory": "1e9"}),
    ("memory-decimal-si", "spec.resources", {"memory": "8G"}),
    ("cpu-millis", "spec.resources", {"cpu": "1500m"}),
    ("cpu-fraction", "spec.resources", {"cpu": "0.5"}),
    ("cpu-plus", "spec.resources", {"cpu": "+2"}),
    ("instance-type-dotted", "spec.resources", {"instanceType": "g5.xlarge"}),
    ("instance-type-underscore", "spec.resources", {"instanceType": "Standard_NC6s_v3"}),
    ("selector-plain", "spec.nodePool", existing(nodeSelector={
        "kubernetes.io/hostname": "gpu-node-0", "example.com/team": "", "team_a": "A.b-c", "karpenter.sh/capacity-type": "spot"})),
    # The label and taint of nodes an administrator sets aside for fine-tuning (the local node).
    ("selector-local-node", "spec.nodePool", existing(
        nodeSelector={"finetune.ai/local-node": "true"},
        tolerations=[{"key": "finetune.ai/local-node", "operator": "Exists", "effect": "NoSchedule"}])),
    ("tolerations-plain", "spec.nodePool", existing(tolerations=[
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml"},
        {"key": "dedicated", "value": ""},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "gpu", "operator": "Exists", "value": None}])),
    ("dataset-path-percent-encoded", "spec.dataset.source", "pvc://data/sub%20dir/train.jsonl"),
    ("model-name-dotted", "spec.output.modelName", "support-bot.v2"),
]

# Cases only the API server can check: rules on metadata.
SERVER_ONLY = {"long-name", "dotted-name"}

# Strings as the API server's CEL isQuantity() and a positive value judge them (measured against
# kube-apiserver v1.35): the Python twin (api.POSITIVE_QUANTITY) must agree on every one.
QUANTITIES = [
    ("1", True), ("512Mi", True), ("1.5Gi", True), ("1.", True), (".5", True), ("1.Gi", True), ("01", True),
    ("1e3", True), ("1E", True), ("1E3", True), ("1e-5", True), ("+1Gi", True), ("1n", True), ("1u", True),
    ("1500m", True), ("8k", True), ("99999999999999999999999Ei", True),
    # zero or negative: quantities, but no request
    ("0", False), ("-0", False), ("+", False), ("-", False), (".", False), ("Ki", False), ("m", False),
    ("e3", False), ("E", False), ("-1", False), ("-.5", False), ("0.000", False),
    # not quantities
    ("", False), ("1ki", False), ("1mi", False), ("512mi", False), ("1Ee3", False), ("1e", False), ("1e+", False),
    ("1e1.5", False), ("1 Gi", False), (" 1", False), ("1Gi ", False), ("0x10", False), ("1,5", False),
    ("1.5.5", False), ("1e99999999999999999999", False), ("1m5", False), ("1Mi5", False), ("1\u00a0Gi", False),
    ("\uff11", False), ("1Gi\n", False),
]
