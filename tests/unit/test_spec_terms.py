"""The trainer's messages, said in the FineTuneJob's terms (spec_terms.in_spec_terms)."""

from __future__ import annotations

import json

import pytest

from finetune_operator import status
from finetune_operator.api import FineTuneJob
from finetune_operator.spec_terms import in_spec_terms, uri_prefixes


def make_job(dataset: str = "pvc://data/sub/train.jsonl", base: str = "pvc://models/base/llama",
             destination: str = "pvc://models/demo") -> FineTuneJob:
    return FineTuneJob.model_validate({"metadata": {"name": "demo", "namespace": "ns", "uid": "u", "generation": 1},
                                       "spec": {"baseModel": {"source": base}, "dataset": {"source": dataset},
                                                "output": {"destination": destination}}})


@pytest.mark.parametrize("said,meant", [
    ("dataset.path: /mnt/pvc/data/sub/train.jsonl does not exist or is not a file",
     "spec.dataset.source: pvc://data/sub/train.jsonl does not exist or is not a file"),
    ("/mnt/pvc/data/sub/train.jsonl:3: not valid JSON", "pvc://data/sub/train.jsonl:3: not valid JSON"),
    ("dataset: only 19 training row(s), fewer than training.globalBatchSize=32; add data",
     "dataset: only 19 training row(s), fewer than spec.training.globalBatchSize=32; add data"),
    ("method.lora.targetModules: no module named q_proj", "spec.method.lora.targetModules: no module named q_proj"),
    ("output.dir: /mnt/output belongs to job other", "spec.output.destination: pvc://models/demo belongs to job other"),
    ("baseModel.source: /mnt/pvc/models/base/llama is not a directory holding a model",
     "spec.baseModel.source: pvc://models/base/llama is not a directory holding a model"),
    ("baseModel.tokenFile: /var/run/secrets/finetune/base-model/token is empty",
     "spec.baseModel.credentialsSecret: /var/run/secrets/finetune/base-model/token is empty"),
    # What the operator filled in has no spec field to name: left as the trainer said it.
    ("checkpointing.keyFile: /etc/finetune/key: permission denied", "checkpointing.keyFile: /etc/finetune/key: permission denied"),
    ("reporting.metricsHost '$(POD_IP)': not set", "reporting.metricsHost '$(POD_IP)': not set"),
    # Already in spec terms, file names, module names and look-alike paths stay.
    ("spec.training.epochs: too many", "spec.training.epochs: too many"),
    ("see support.jsonl and torch.cuda", "see support.jsonl and torch.cuda"),
    ("/mnt/pvc/data-2/x and /mnt/pvc/database", "/mnt/pvc/data-2/x and /mnt/pvc/database"),
    ("ends at /mnt/pvc/data.", "ends at pvc://data."),
])
def test_trainer_paths_become_the_specs_fields_and_uris(said, meant):
    assert in_spec_terms(said, make_job()) == meant


def test_each_volume_root_stands_for_its_uri_prefix_in_a_pod_and_in_a_local_run():
    job = make_job(dataset="configmap://cm/train.jsonl", destination="pvc://models/runs/demo/")
    assert uri_prefixes(job) == {"/mnt/pvc/models": "pvc://models", "/mnt/configmap/cm": "configmap://cm",
                                 "/mnt/output": "pvc://models/runs/demo"}
    # Locally each claim is a directory; the output is a path inside its claim's, not a mount of its own.
    local = {"data": "/tmp/d", "models": "/tmp/m"}
    assert uri_prefixes(make_job(), local) == {"/tmp/m": "pvc://models", "/tmp/d": "pvc://data"}
    assert (in_spec_terms("output.dir: /tmp/m/demo is owned by job x", make_job(), local)
            == "spec.output.destination: pvc://models/demo is owned by job x")


def test_a_failed_jobs_condition_says_the_trainers_error_in_spec_terms():
    trainer_job = {"metadata": {"name": "demo-trainer"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}]}}
    message = json.dumps({"error": "dataset.path: /mnt/pvc/data/sub/train.jsonl:7: not valid JSON", "exitCode": 2})
    pod = {"metadata": {"name": "demo-trainer-0-abc", "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 2, "message": message}}}]}}
    obs = status.observe(make_job(), trainer_job, [pod])
    assert obs.phase == "Failed" and obs.reason == "InvalidInput"
    assert "spec.dataset.source: pvc://data/sub/train.jsonl:7: not valid JSON" in obs.message
    assert "/mnt/pvc" not in obs.message and "dataset.path" not in obs.message
