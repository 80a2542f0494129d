import json

import pytest

pytest.importorskip("torch")
from finetune_trainer.config import parse_config  # noqa: E402
from finetune_trainer.outputs import termination_message, write_results  # noqa: E402
from finetune_trainer.protocol import TERMINATION_MESSAGE_LIMIT  # noqa: E402

METRICS = {"trainLoss": 1.0, "evalLoss": 1.1, "initialEvalLoss": 3.0, "steps": 5, "tokens": 100}


def test_termination_message_keeps_primary_file_when_too_long():
    files = {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 10}}
    files |= {f"tokenizer-extra-{i}.json": {"sha256": "b" * 64, "size": i} for i in range(60)}
    result = {"files": files, "metrics": METRICS}
    message = termination_message(result)
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    short = json.loads(message)
    assert short == {"files": {"adapter_model.safetensors": files["adapter_model.safetensors"]},
                     "metrics": METRICS, "filesOmitted": 60}
    small = {"files": {"adapter_model.safetensors": files["adapter_model.safetensors"]}, "metrics": METRICS}
    assert json.loads(termination_message(small)) == small


def test_result_json_is_written_last_and_lists_every_file(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter_config.json").write_text("{}")
    config = parse_config({
        "jobName": "j", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d"},
        "output": {"dir": str(tmp_path)}, "modelManifest": {"kind": "Model", "spec": {}},
    })
    result = write_results(config, tmp_path, ["adapter_model.safetensors", "adapter_config.json"], METRICS)
    assert set(result["files"]) == {"adapter_model.safetensors", "adapter_config.json", "model.yaml"}
    assert result["files"]["adapter_model.safetensors"]["size"] == 7
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert not list(tmp_path.glob("*.tmp"))
