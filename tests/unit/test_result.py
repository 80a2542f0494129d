import json

import pytest
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, TERMINATION_MESSAGE_LIMIT
from finetune_trainer.result import InvalidResult, parse_result, termination_message

GOOD = {
    "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}, "adapter_config.json": {"sha256": "b" * 64, "size": 2}},
    "metrics": {"trainLoss": 1.0, "evalLoss": 1.1, "initialEvalLoss": 3.0, "steps": 5, "tokens": 100},
    "world": {"worldSize": 2, "nodes": 1, "processesPerNode": 2},
}


def test_valid_result():
    result = parse_result(json.dumps(GOOD))
    assert result.format == "peft" and result.weights_file == "adapter_model.safetensors" and result.model_size == 12
    assert (result.world.world_size, result.world.nodes, result.world.processes_per_node) == (2, 1, 2)


def test_the_world_stays_in_a_shortened_termination_message():
    files = {f"extra-{i:04d}.json": {"sha256": f"{i:064x}", "size": 7} for i in range(60)}
    full = parse_result(json.dumps({**GOOD, "files": {**GOOD["files"], **files}}))
    message = termination_message(full)
    assert json.loads(message)["world"] == GOOD["world"] and parse_result(message).world == full.world


def test_the_manifest_is_an_output_but_not_part_of_the_model():
    raw = {**GOOD, "files": {**GOOD["files"], MODEL_MANIFEST_FILE: {"sha256": "c" * 64, "size": 900}}}
    result = parse_result(json.dumps(raw))
    assert MODEL_MANIFEST_FILE not in result.model_files() and result.model_size == 12


def test_full_weights_in_shards_are_identified_by_their_index():
    raw = {**GOOD, "files": {"model-00001-of-00002.safetensors": {"sha256": "c" * 64, "size": 5},
                             "model-00002-of-00002.safetensors": {"sha256": "d" * 64, "size": 5},
                             "model.safetensors.index.json": {"sha256": "e" * 64, "size": 1}}}
    result = parse_result(json.dumps(raw))
    assert result.format == "full" and result.weights_file == "model.safetensors.index.json"


def test_a_newer_trainer_may_add_fields():
    result = parse_result(json.dumps({**GOOD, "newField": 1, "metrics": {**GOOD["metrics"], "newMetric": 2}}))
    assert result.metrics.steps == 5


def test_a_long_result_keeps_the_weights_and_the_size():
    files = {f"extra-{i:04d}.json": {"sha256": f"{i:064x}", "size": 7} for i in range(60)}
    files.update(GOOD["files"])
    files[MODEL_MANIFEST_FILE] = {"sha256": "c" * 64, "size": 900}
    full = parse_result(json.dumps({**GOOD, "files": files}))
    message = termination_message(full)
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    short = parse_result(message)
    assert list(short.files) == ["adapter_model.safetensors"] and short.files_omitted == len(files) - 1
    assert short.model_size == full.model_size == 12 + 60 * 7


@pytest.mark.parametrize("message,expected", [
    (None, "reported no result"),
    ("   ", "reported no result"),
    ("{not json", "not JSON"),
    (json.dumps({"metrics": GOOD["metrics"]}), "files"),
    (json.dumps({**GOOD, "files": {}}), "files"),
    (json.dumps({**GOOD, "metrics": {**GOOD["metrics"], "trainLoss": float("nan")}}), "finite"),
    (json.dumps({**GOOD, "metrics": {**GOOD["metrics"], "steps": 0}}), "metrics.steps"),
    (json.dumps({**GOOD, "files": {"adapter_config.json": {"sha256": "b" * 64, "size": 2}}}), "no weights file"),
    (json.dumps({**GOOD, "files": {"model-00001-of-00002.safetensors": {"sha256": "c" * 64, "size": 5}}}), "no weights file"),
    (json.dumps({**GOOD, "files": {"adapter_model.safetensors": {"sha256": "XYZ", "size": 1}}}), "sha256"),
    # A result that does not say which world trained it cannot be checked against the job.
    (json.dumps({k: v for k, v in GOOD.items() if k != "world"}), "world: Field required"),
    (json.dumps({**GOOD, "world": {**GOOD["world"], "worldSize": 0}}), "world.worldSize"),
])
def test_invalid_results(message, expected):
    with pytest.raises(InvalidResult, match=expected):
        parse_result(message)
