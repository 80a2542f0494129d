"""The API server itself enforces the FineTuneJob schema: bad specs fail at `kubectl apply` with a
message naming the field, defaults are filled in, and the spec is immutable where it must be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetools import REPO, Kubectl
from spec_cases import ACCEPTED, INVALID, QUANTITIES, VALID, with_changes


@pytest.mark.parametrize("case,path,value,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_are_rejected_at_apply(kubectl, case, path, value, expected):
    # As JSON: YAML would leave strings such as 1e3 unquoted, and kubectl would read a number.
    proc = kubectl.apply(json.dumps(with_changes(path, value)), dry_run=True, check=False)
    assert proc.returncode != 0, f"{case}: the API server accepted an invalid spec"
    assert expected in proc.stderr, f"{case}: expected {expected!r} in:\n{proc.stderr}"


@pytest.mark.parametrize("case,path,value", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_valid_specs_are_accepted(kubectl, case, path, value):
    proc = kubectl.apply(json.dumps(with_changes(path, value)), dry_run=True, check=False)
    assert proc.returncode == 0, f"{case}: the API server refused a valid spec:\n{proc.stderr}"


def test_quantities_are_judged_as_the_parser_judges_them(kubectl):
    """The table the Python twin is unit-tested against (tests/unit/test_spec_rules.py) is what
    this API server says."""
    verdicts = {}
    for text, _ in QUANTITIES:
        proc = kubectl.apply(json.dumps(with_changes("spec.resources", {"memory": text})), dry_run=True, check=False)
        verdicts[text] = proc.returncode == 0
        assert proc.returncode == 0 or "spec.resources.memory" in proc.stderr, proc.stderr
    wrong = {text: verdicts[text] for text, accepted in QUANTITIES if verdicts[text] is not accepted}
    assert not wrong, f"the API server's verdict differs from the table: {wrong}"


def test_defaults_come_from_the_schema(kubectl):
    created = kubectl.create(VALID)
    spec = created["spec"]
    assert spec["method"] == {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}}
    assert spec["training"]["epochs"] == "auto" and spec["training"]["globalBatchSize"] == "auto"
    # The trainer's own settings, with the trainer's defaults (one definition: finetune_trainer.config).
    assert spec["training"]["lrScheduler"] == "cosine" and spec["training"]["maxGradNorm"] == 1.0
    # Unset: the trainer decides at start-up (checkpointing as memory needs; compile where it pays).
    assert "gradientCheckpointing" not in spec["training"] and "compile" not in spec["training"]
    assert spec["distributed"] == {"zeroStage": 2, "offload": "none", "nodes": 1}
    assert spec["resources"]["accelerator"] == "nvidia.com/gpu"
    assert spec["checkpointing"] == {"everySteps": 200, "keep": 2}
    assert spec["suspend"] is False and spec["backoffLimit"] == 3
    assert spec["nodePool"] == {"capacityType": "on-demand"}


def test_spec_is_immutable_but_lifecycle_fields_are_not(kubectl):
    kubectl.create(VALID)
    proc = kubectl.merge_patch("ftj", "valid", {"spec": {"training": {"learningRate": 0.1}}}, check=False)
    assert proc.returncode != 0
    assert "training is immutable once the job is created" in proc.stderr
    proc = kubectl.merge_patch("ftj", "valid", {"spec": {"dataset": {"source": "pvc://data/other.jsonl"}}}, check=False)
    assert "dataset is immutable" in proc.stderr
    kubectl.merge_patch("ftj", "valid", {"spec": {"suspend": True, "activeDeadlineSeconds": 600}})
    assert kubectl.get("ftj", "valid")["spec"]["suspend"] is True


# One change per immutable section, each valid on its own (so only the immutability rule refuses it).
IMMUTABLE_CHANGES = {
    "baseModel": {"source": "preset://llama-1b"},
    "dataset": {"source": "pvc://data/other.jsonl"},
    "method": {"lora": {"r": 4}},
    "training": {"learningRate": 0.1},
    "distributed": {"zeroStage": 3},
    "resources": {"cpu": "3"},
    "nodePool": {"capacityType": "spot"},
    "output": {"destination": "pvc://models/elsewhere"},
    "checkpointing": {"everySteps": 7},
    "trainerPod": {"labels": {"team": "b"}},
}


def _immutable_sections() -> set[str]:
    """The sections whose CRD schema carries the immutability rule (api.py declares them)."""
    crd = yaml.safe_load((REPO / "crds" / "finetune.ai_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return {name for name, schema in spec.items()
            if any(rule.get("rule") == "self == oldSelf" for rule in schema.get("x-kubernetes-validations", []))}


def test_every_immutable_section_is_tested():
    assert set(IMMUTABLE_CHANGES) == _immutable_sections()


@pytest.mark.parametrize("section", sorted(IMMUTABLE_CHANGES))
def test_each_immutable_section_refuses_a_change(kubectl, section):
    kubectl.create(VALID)
    proc = kubectl.merge_patch("ftj", "valid", {"spec": {section: IMMUTABLE_CHANGES[section]}}, check=False)
    assert proc.returncode != 0
    assert f"{section} is immutable once the job is created" in proc.stderr, proc.stderr
    # The same change is valid on a new job: only immutability refused it.
    kubectl.apply(with_changes(f"spec.{section}", {**VALID["spec"].get(section, {}), **IMMUTABLE_CHANGES[section]}),
                  dry_run=True)


def test_every_example_is_accepted(kubectl):
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples, "no examples/*.yaml"
    for path in examples:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc and doc.get("kind") == "FineTuneJob":
                kubectl.apply(doc, dry_run=True)


def test_printer_columns(kubectl):
    kubectl.create(VALID)
    header = kubectl("get", "ftj").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "AGE"]
    assert kubectl("get", "finetunejobs.finetune.ai", "valid", "-o", "name").stdout.strip() == "finetunejob.finetune.ai/valid"


def test_a_job_of_several_nodes_is_named_like_a_service(kubectl: Kubectl) -> None:
    """Its pods find each other through a headless Service named after it (a DNS-1035 label)."""
    several = with_changes("spec.distributed", {"nodes": 2}, name="7b-sft")
    proc = kubectl.apply(several, dry_run=True, check=False)
    assert proc.returncode != 0 and "metadata.name must start with a letter when distributed.nodes > 1" in proc.stderr
    assert kubectl.apply(with_changes("spec.distributed", {"nodes": 1}, name="7b-sft"), dry_run=True, check=False).returncode == 0
    assert kubectl.apply(with_changes("spec.distributed", {"nodes": 2}, name="b7-sft"), dry_run=True, check=False).returncode == 0
