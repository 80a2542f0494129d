import json

import pytest

from finetune_operator.result import InvalidResult, parse_result

GOOD = {
    "files": {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}, "adapter_config.json": {"sha256": "b" * 64, "size": 2}},
    "metrics": {"trainLoss": 1.0, "evalLoss": 1.1, "initialEvalLoss": 3.0, "steps": 5, "tokens": 100},
}


def test_valid_result():
    result = parse_result(json.dumps(GOOD))
    assert result.format == "peft" and result.weights_file == "adapter_model.safetensors" and result.total_size == 12


def test_full_weights_in_shards():
    raw = {**GOOD, "files": {"model-00001-of-00002.safetensors": {"sha256": "c" * 64, "size": 5},
                             "model-00002-of-00002.safetensors": {"sha256": "d" * 64, "size": 5}}}
    result = parse_result(json.dumps(raw))
    assert result.format == "full" and result.weights_file == "model-00001-of-00002.safetensors"


@pytest.mark.parametrize("message,expected", [
    (None, "reported no result"),
    ("   ", "reported no result"),
    ("{not json", "not JSON"),
    (json.dumps({"metrics": GOOD["metrics"]}), "files"),
    (json.dumps({**GOOD, "files": {}}), "files"),
    (json.dumps({**GOOD, "metrics": {**GOOD["metrics"], "trainLoss": float("nan")}}), "finite"),
    (json.dumps({**GOOD, "metrics": {**GOOD["metrics"], "steps": 0}}), "metrics.steps"),
    (json.dumps({**GOOD, "files": {"adapter_config.json": {"sha256": "b" * 64, "size": 2}}}), "no weights file"),
    (json.dumps({**GOOD, "files": {"adapter_model.safetensors": {"sha256": "XYZ", "size": 1}}}), "sha256"),
])
def test_invalid_results(message, expected):
    with pytest.raises(InvalidResult, match=expected):
        parse_result(message)
