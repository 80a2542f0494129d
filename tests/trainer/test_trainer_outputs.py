import json

import pytest

pytest.importorskip("torch")
from finetune_trainer.config import parse_config  # noqa: E402
from finetune_trainer.outputs import write_results  # noqa: E402
from finetune_trainer.result import World, parse_result  # noqa: E402

METRICS = {"trainLoss": 1.0, "evalLoss": 1.1, "initialEvalLoss": 3.0, "steps": 5, "tokens": 100}


def test_result_json_is_written_last_and_lists_every_file(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter_config.json").write_text("{}")
    config = parse_config({
        "jobName": "j", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d"},
        "output": {"dir": str(tmp_path)},
        "reporting": {"terminationMessagePath": str(tmp_path / "termination-log")},
        "publish": {"name": "m", "uri": "pvc://models/m", "baseModel": {"source": "preset://tiny-llama"},
                    "dataset": {"source": "pvc://data/d.jsonl"}, "sourceJob": {"name": "j", "uid": "u"}},
    })
    result = write_results(config, tmp_path, ["adapter_model.safetensors", "adapter_config.json"], METRICS,
                           World(world_size=1, nodes=1, processes_per_node=1))
    assert set(result["files"]) == {"adapter_model.safetensors", "adapter_config.json", "model.yaml"}
    assert result["files"]["adapter_model.safetensors"]["size"] == 7
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert not list(tmp_path.glob("*.tmp"))
    # The termination message is the same result, which the operator parses.
    assert parse_result((tmp_path / "termination-log").read_text()).to_wire() == result
