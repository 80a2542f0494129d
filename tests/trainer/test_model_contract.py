"""One contract, end to end: a FineTuneJob rendered by the operator, trained for real by the trainer,
published by the operator from the termination message; the published Model is model.yaml, field
by field, and both describe the files on disk."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from finetune_operator.api import FineTuneJob
from finetune_operator.model import build_model, model_status
from finetune_operator.trainer_config import render
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, OWNER_FILE, RESULT_FILE
from finetune_trainer.result import parse_result
from trainer_helpers import (
    arithmetic_chat,
    make_config,
    assert_ok,
    run_trainer,
    write_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def test_the_published_model_is_model_yaml_field_by_field(tmp_path):
    data_dir, model_dir = tmp_path / "data", tmp_path / "models"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", arithmetic_chat(48))
    job = FineTuneJob.model_validate({
        "metadata": {"name": "contract", "namespace": "team-a", "uid": "uid-contract", "generation": 1},
        "spec": {
            "baseModel": {"source": "preset://tiny-llama"},
            "dataset": {"source": "pvc://data/train.jsonl", "validationSplit": 0.1},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
            "training": {"epochs": 1, "maxSteps": 3, "microBatchSize": 2, "globalBatchSize": 4, "maxSeqLength": 128,
                         "learningRate": 3e-3, "warmupSteps": 1, "lrScheduler": "linear"},
            "resources": {"accelerator": "none", "cpu": "1", "memory": "2Gi"},
            "output": {"destination": "pvc://models/contract", "modelName": "contract-v1"},
        },
    })
    termination_log = tmp_path / "termination-log"
    config = render(job, claim_dirs={"data": str(data_dir), "models": str(model_dir)},
                    reporting={"progressFile": str(tmp_path / "progress.jsonl"),
                               "terminationMessagePath": str(termination_log)})
    assert_ok(run_trainer(write_config(tmp_path, config)))

    out = model_dir / "contract"
    manifest = yaml.safe_load((out / MODEL_MANIFEST_FILE).read_text())
    result = parse_result(termination_log.read_text())
    published, status = build_model(job, result), model_status(result, 1)

    assert manifest["apiVersion"] == published["apiVersion"] and manifest["kind"] == published["kind"] == "Model"
    assert manifest["metadata"] == {k: published["metadata"][k] for k in ("name", "namespace")}
    assert manifest["metadata"]["name"] == "contract-v1"
    assert set(manifest["spec"]) == set(published["spec"])
    for field in manifest["spec"]:
        assert manifest["spec"][field] == published["spec"][field], field
    assert manifest["status"]["metrics"] == status["metrics"]

    # What both say is what is on disk.
    # (The owner file says whose directory this is; it is not part of the model.)
    on_disk = {p.name: p for p in out.iterdir() if p.is_file() and p.name not in (MODEL_MANIFEST_FILE, RESULT_FILE, OWNER_FILE)}
    assert (out / OWNER_FILE).is_file()
    adapter = published["spec"]["adapter"]
    assert set(adapter["files"]) == set(on_disk)
    for name, path in on_disk.items():
        assert adapter["files"][name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                          "size": path.stat().st_size}, name
    assert adapter["sha256"] == adapter["files"]["adapter_model.safetensors"]["sha256"]
    assert adapter["sizeBytes"] == sum(p.stat().st_size for p in on_disk.values())
    assert adapter["uri"] == "pvc://models/contract" and adapter["format"] == "peft"
    # The job's settings as trained, including those only the trainer used to know.
    assert published["spec"]["training"]["warmupSteps"] == 1 and published["spec"]["training"]["lrScheduler"] == "linear"
    assert status["metrics"]["steps"] == 3


def test_bad_data_under_torchrun_reaches_the_operator_as_invalid_input(tmp_path):
    """The failure half of the contract: under torchrun the container exits 1 whatever the trainer
    exited with, so only the termination message the trainer writes says "bad data, do not
    retry". The real trainer's message, read by the operator's real classifier."""
    from finetune_operator.failures import classify, operator_decides

    dataset = write_jsonl(tmp_path / "bad.jsonl", [*arithmetic_chat(3), "{broken"])
    termination = tmp_path / "termination-log"
    config = make_config(tmp_path, dataset, **{"reporting.terminationMessagePath": str(termination)})
    ran = run_trainer(write_config(tmp_path, config), nproc=2)
    assert ran.returncode == 1, ran.stderr[-2000:]  # torchrun's own code: the real one is only in the message

    pod = {"metadata": {"name": "bad-trainer-0", "creationTimestamp": "2026-12-02T00:00:00Z"}, "status": {
        "phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
            "exitCode": ran.returncode, "reason": "Error", "message": termination.read_text(),
            "finishedAt": "2026-12-02T00:01:00Z"}}}]}}
    failure = classify(pod)
    assert (failure.reason, failure.retryable) == ("InvalidInput", False)
    assert failure.message == ("bad configuration or data, retrying cannot help: pod bad-trainer-0: "
                               f"exit code 2 (Error): {dataset}:4: not valid JSON (Expecting property name enclosed in double quotes) "
                               "(set dataset.skipBadLines to skip bad lines)")
    # The Job controller's pod failure policy saw exit 1, a retryable code: the operator ends it.
    assert operator_decides(pod) == failure
