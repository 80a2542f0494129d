import json

from factories import make_job

import copy

from finetune_operator.model import build_model, model_status, publish_config, published_here
from finetune_operator.trainer_config import render
from finetune_trainer.config import parse_config
from finetune_trainer.model_manifest import render_model
from finetune_trainer.result import parse_result

RESULT = parse_result(json.dumps({
    "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}, "tokenizer.json": {"sha256": "b" * 64, "size": 5}},
    "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "initialEvalLoss": 3.0, "steps": 9, "tokens": 99},
    "world": {"worldSize": 1, "nodes": 1, "processesPerNode": 1},
}))


def test_model_from_result():
    ftj = make_job(output={"destination": "pvc://models/x", "modelName": "support-bot-v2"})
    model = build_model(ftj, RESULT)
    assert model["metadata"]["name"] == "support-bot-v2"
    assert model["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = model["spec"]
    assert spec["adapter"] == {"uri": "pvc://models/x", "format": "peft", "sha256": "a" * 64, "sizeBytes": 15,
                               "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10},
                                         "tokenizer.json": {"sha256": "b" * 64, "size": 5}}}
    assert spec["sourceJob"] == {"name": "demo", "uid": "uid-1"}
    assert spec["world"] == {"worldSize": 1, "nodes": 1, "processesPerNode": 1}  # lineage: the world it trained in
    assert spec["method"]["type"] == "lora" and spec["dataset"]["source"] == "pvc://data/sets/train.jsonl"
    assert published_here(model, model, ftj)


def test_a_model_is_this_jobs_only_if_it_controls_it_and_its_spec_is_the_one_built():
    ftj = make_job()
    built = build_model(ftj, RESULT)
    # A forgery: the job's UID copied into sourceJob, someone else's weights.
    forged = copy.deepcopy(built)
    forged["metadata"]["ownerReferences"] = []
    forged["spec"]["adapter"]["uri"] = "pvc://elsewhere/x"
    assert not published_here(forged, built, ftj)
    # Even with the job as its controller, a different spec is not what this job published.
    with_owner = copy.deepcopy(forged)
    with_owner["metadata"]["ownerReferences"] = built["metadata"]["ownerReferences"]
    assert not published_here(with_owner, built, ftj)
    # The right spec without the controller reference (a namesake, or a copy) is not it either.
    unowned = copy.deepcopy(built)
    unowned["metadata"]["ownerReferences"][0]["controller"] = False
    assert not published_here(unowned, built, ftj)
    # What the API server returns for the operator's own create: numbers may come back as ints.
    returned = copy.deepcopy(built)
    returned["spec"]["training"]["maxGradNorm"] = 1
    assert published_here(returned, built, ftj)


def test_model_status_ready_with_metrics():
    status = model_status(RESULT, 1)
    assert status["phase"] == "Ready" and status["metrics"]["tokensSeen"] == 99 and status["metrics"]["evalLoss"] == 0.7


def test_the_trainer_renders_the_model_the_operator_publishes():
    """The trainer writes model.yaml from its config with the same function the operator
    publishes with; what it gets in its config must lead to the same Model."""
    ftj = make_job(training={"warmupSteps": 3, "lrScheduler": "linear"})
    config = parse_config(render(ftj, progress_url=""))
    assert config.publish == publish_config(ftj)
    manifest = render_model(config.publish, config.method, config.training, RESULT)
    published = build_model(ftj, RESULT)
    assert manifest["spec"] == published["spec"]
    assert {k: published["metadata"][k] for k in ("name", "namespace")} == manifest["metadata"]
    assert manifest["status"]["metrics"] == model_status(RESULT, 1)["metrics"]
    assert published["spec"]["training"]["warmupSteps"] == 3
