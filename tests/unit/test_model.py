import json

from factories import make_job

from finetune_operator.model import build_model, manifest_template, model_status, same_lineage
from finetune_operator.result import parse_result

RESULT = parse_result(json.dumps({
    "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}, "tokenizer.json": {"sha256": "b" * 64, "size": 5}},
    "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "initialEvalLoss": 3.0, "steps": 9, "tokens": 99},
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
    assert spec["method"]["type"] == "lora" and spec["dataset"]["source"] == "pvc://data/sets/train.jsonl"
    assert same_lineage(model, ftj)
    assert not same_lineage({"spec": {"sourceJob": {"uid": "other"}}}, ftj)


def test_model_status_ready_with_metrics():
    status = model_status(RESULT, 1)
    assert status["phase"] == "Ready" and status["metrics"]["tokensSeen"] == 99 and status["metrics"]["evalLoss"] == 0.7


def test_manifest_template_matches_published_lineage():
    ftj = make_job()
    template = manifest_template(ftj)
    published = build_model(ftj, RESULT)["spec"]
    for key in ("baseModel", "method", "training", "dataset", "sourceJob"):
        assert template["spec"][key] == published[key]
