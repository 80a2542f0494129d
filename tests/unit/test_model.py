import json

from factories import make_job

import copy
from datetime import datetime, timezone

from finetune_operator import naming
from finetune_operator.api import FineTuneJob
from finetune_operator.model import build_model, model_status, model_to_validate, publish_config, published_here
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
    assert "ownerReferences" not in model["metadata"]  # it outlives the job
    spec = model["spec"]
    assert spec["adapter"] == {"uri": "pvc://models/x", "format": "peft", "sha256": "a" * 64, "sizeBytes": 15,
                               "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10},
                                         "tokenizer.json": {"sha256": "b" * 64, "size": 5}}}
    assert spec["sourceJob"] == {"name": "demo", "uid": "uid-1"}
    assert spec["world"] == {"worldSize": 1, "nodes": 1, "processesPerNode": 1}  # lineage: the world it trained in
    assert spec["method"]["type"] == "lora" and spec["dataset"]["source"] == "pvc://data/sets/train.jsonl"
    assert published_here(model, model, ftj)


def test_a_model_is_this_jobs_only_if_its_spec_is_the_one_built():
    ftj = make_job(output={"destination": "pvc://models/x", "deleteModelWithJob": True})
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
    for field, value in (("sha256", "f" * 64), ("sizeBytes", 16)):
        other_weights = copy.deepcopy(built)
        other_weights["spec"]["adapter"][field] = value
        assert not published_here(other_weights, built, ftj), field
    # The job asked for its Model to go with it: the right spec without the controller
    # reference (a namesake, or a copy) would outlive it, so it is not this job's.
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


def test_publish_config_is_the_job_in_the_users_terms():
    ftj = make_job(baseModel={"source": "hf://org/base", "revision": "v2"},
                   dataset={"source": "pvc://data/sets/train.jsonl", "sha256": "c" * 64},
                   output={"destination": "pvc://models/out", "modelName": "bot"})
    assert publish_config(ftj).to_wire() == {
        "name": "bot", "namespace": "team-a", "uri": "pvc://models/out",
        "baseModel": {"source": "hf://org/base", "revision": "v2"},
        "dataset": {"source": "pvc://data/sets/train.jsonl", "sha256": "c" * 64},
        "sourceJob": {"name": "demo", "uid": "uid-1"},
    }
    # A job not yet created has no UID: the reference says so with an empty one.
    raw = ftj.model_dump(by_alias=True, exclude_none=True, mode="json")
    del raw["metadata"]["uid"]
    assert publish_config(FineTuneJob.model_validate(raw)).source_job.uid == ""


def test_the_model_is_labelled_outlives_its_job_and_has_no_status():
    model = build_model(make_job(), RESULT)
    assert model["apiVersion"] == "finetune.ai/v1alpha1" and model["kind"] == "Model"
    assert "status" not in model
    assert model["metadata"] == {
        "name": "demo",
        "namespace": "team-a",
        "labels": {
            "app.kubernetes.io/name": "finetune-trainer",
            "app.kubernetes.io/instance": "demo",
            "app.kubernetes.io/managed-by": "finetune-operator",
            "app.kubernetes.io/component": "model",
            "finetune.ai/job": "demo",
        },
    }
    # Deleted with its job only when the spec says so: then the job controls it.
    owned = build_model(make_job(output={"destination": "pvc://models/x", "deleteModelWithJob": True}), RESULT)
    assert owned["metadata"]["ownerReferences"] == [{
        "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "name": "demo",
        "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]


def test_the_model_to_validate_has_placeholder_digests_for_the_methods_weights_file():
    zeros = "0" * 64
    for method, weights, fmt in (({"type": "lora"}, "adapter_model.safetensors", "peft"),
                                 ({"type": "full"}, "model.safetensors", "full")):
        ftj = make_job(method=method, output={"destination": "pvc://models/x", "modelName": "bot",
                                              "deleteModelWithJob": True})
        model = model_to_validate(ftj)
        assert model["metadata"]["name"] == "bot" and model["metadata"]["namespace"] == "team-a"
        assert model["metadata"]["ownerReferences"] == [naming.owner_reference(ftj)]
        assert model["spec"]["adapter"] == {"uri": "pvc://models/x", "format": fmt, "sha256": zeros, "sizeBytes": 0,
                                            "files": {weights: {"sha256": zeros, "size": 0}}}
        assert model["spec"]["world"] == {"worldSize": 1, "nodes": 1, "processesPerNode": 1}
        assert model["spec"]["method"]["type"] == method["type"]
        assert "status" not in model


def test_model_status_is_ready_as_of_now_for_the_models_generation():
    now = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=timezone.utc)
    assert model_status(RESULT, 3, now) == {
        "phase": "Ready",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                        "message": "weights written and verified by the trainer",
                        "lastTransitionTime": "2026-03-04T05:06:07Z", "observedGeneration": 3}],
        "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "initialEvalLoss": 3.0, "steps": 9, "tokensSeen": 99},
    }
    # Without a generation the condition leaves it out; without a time it is the current one.
    before = datetime.now(timezone.utc).replace(microsecond=0)
    condition = model_status(RESULT, None)["conditions"][0]
    after = datetime.now(timezone.utc)
    assert "observedGeneration" not in condition
    assert before <= datetime.fromisoformat(condition["lastTransitionTime"].replace("Z", "+00:00")) <= after


def test_a_model_without_owner_references_is_this_jobs_only_when_it_outlives_the_job():
    assert published_here({"spec": (b := build_model(make_job(), RESULT))["spec"]}, b, make_job())
    ftj = make_job(output={"destination": "pvc://models/x", "deleteModelWithJob": True})
    built = build_model(ftj, RESULT)
    assert not published_here({"spec": built["spec"]}, built, ftj)
    assert not published_here({"metadata": {"ownerReferences": None}, "spec": built["spec"]}, built, ftj)
    # Another job as controller: a namesake's Model, even with the same spec.
    other = copy.deepcopy(built)
    other["metadata"]["ownerReferences"][0]["uid"] = "uid-2"
    assert not published_here(other, built, ftj)
    # This job among other owners, as their controller: it is this job's.
    shared = copy.deepcopy(built)
    shared["metadata"]["ownerReferences"].insert(0, {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "uid-9"})
    assert published_here(shared, built, ftj)
