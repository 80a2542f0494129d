import hashlib
import json
import pytest

import torch  # noqa: F401  (a broken install fails, never skips)
import yaml
from finetune_trainer.config import parse_config  # noqa: E402
from finetune_trainer.model_manifest import render_model  # noqa: E402
from finetune_trainer.outputs import (  # noqa: E402
    describe_files, gather_trainable_state_dict, publish_staged, save_weights, write_results, write_termination_message,
)
from finetune_trainer.result import ResultMetrics, TrainerResult, World, parse_result  # noqa: E402
from finetune_trainer.run_plan import RunPlan  # noqa: E402

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


PUBLISH = {"name": "m", "uri": "pvc://models/m", "baseModel": {"source": "preset://tiny-llama"},
           "dataset": {"source": "pvc://data/d.jsonl"}, "sourceJob": {"name": "j", "uid": "u"}}
WORLD = World(world_size=2, nodes=1, processes_per_node=2)


def job_config(tmp_path, **sections):
    return parse_config({"jobName": "j", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d"},
                         "output": {"dir": str(tmp_path)}, **sections})


def digest(path):
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def run_plan():
    return RunPlan(device="cpu", world_size=2, precision="fp32", attention="sdpa", compile=False, fused_loss=False,
                   checkpointed_layers=0, layers=2, zero_stage=2, offload="none", micro_batch_size=1, global_batch_size=8,
                   accumulation_steps=4, total_steps=5, deepspeed={"zero_optimization": {"stage": 2}})


def test_without_a_publish_section_result_json_lists_the_outputs_and_nothing_else(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"full weights")
    (tmp_path / "config.json").write_text('{"a": 1}')
    result = write_results(job_config(tmp_path), tmp_path, ["model.safetensors", "config.json"], METRICS, WORLD,
                           run_plan())
    assert result == {
        "files": {"config.json": digest(tmp_path / "config.json"),
                  "model.safetensors": digest(tmp_path / "model.safetensors")},
        "metrics": {"trainLoss": 1.0, "evalLoss": 1.1, "initialEvalLoss": 3.0, "steps": 5, "tokens": 100,
                    "skippedLines": 0},
        "world": {"worldSize": 2, "nodes": 1, "processesPerNode": 2},
        "runPlan": run_plan().to_wire(),
        "filesOmitted": 0, "omittedBytes": 0,
    }
    assert list(result["files"]) == ["config.json", "model.safetensors"]
    assert (tmp_path / "result.json").read_text() == json.dumps(result, indent=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "result.json"]


def test_model_yaml_is_the_manifest_of_the_files_before_it(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("{}")
    config = job_config(tmp_path, publish=PUBLISH)
    names = ["tokenizer.json", "adapter_model.safetensors"]
    result = write_results(config, tmp_path, names, METRICS, WORLD, run_plan())
    provisional = TrainerResult(files={name: digest(tmp_path / name) for name in names},
                                metrics=ResultMetrics.model_validate(METRICS), world=WORLD, run_plan=run_plan())
    manifest = render_model(config.publish, config.method, config.training, provisional)
    assert manifest["spec"]["runPlan"]["zeroStage"] == 2 and manifest["spec"]["adapter"]["sizeBytes"] == 9
    # In the order render_model gives (apiVersion, kind, metadata, spec: baseModel, adapter, ...).
    assert (tmp_path / "model.yaml").read_text() == yaml.safe_dump(manifest, sort_keys=False)
    assert result["files"]["model.yaml"] == digest(tmp_path / "model.yaml")
    assert result["runPlan"] == run_plan().to_wire()
    assert not (tmp_path / "termination-log").exists()


def test_the_termination_message_is_the_compact_result(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    log = tmp_path / "termination-log"
    log.write_text("x" * 5000)  # left over from an earlier run: replaced, not appended to
    config = job_config(tmp_path, reporting={"terminationMessagePath": str(log)})
    result = write_results(config, tmp_path, ["adapter_model.safetensors"], METRICS, WORLD)
    assert log.read_text() == json.dumps(result, separators=(",", ":"))


def test_a_termination_message_is_cut_to_the_limit_and_an_unwritable_one_is_skipped(tmp_path):
    path = tmp_path / "termination-log"
    write_termination_message(str(path), "a" * 4096 + "b")
    assert path.read_text() == "a" * 4096
    write_termination_message(str(path), "short")
    assert path.read_text() == "short"
    write_termination_message(str(tmp_path / "missing" / "termination-log"), "x")  # no error
    assert not (tmp_path / "missing").exists()


def test_publish_staged_moves_every_file_and_removes_staging(tmp_path):
    staging, output = tmp_path / "staging", tmp_path / "out"
    (staging / "sub" / "deep").mkdir(parents=True)
    (staging / "empty").mkdir()
    (staging / "z.bin").write_bytes(b"z")
    (staging / "a.json").write_text("a")
    (staging / "sub" / "deep" / "x.txt").write_text("x")
    output.mkdir()
    (output / "a.json").write_text("old")  # replaced
    assert publish_staged(staging, output) == ["a.json", "sub/deep/x.txt", "z.bin"]
    assert not staging.exists()
    assert (output / "a.json").read_text() == "a" and (output / "z.bin").read_bytes() == b"z"
    assert (output / "sub" / "deep" / "x.txt").read_text() == "x"
    assert not (output / "empty").exists()


def test_describe_files_gives_each_files_digest_in_name_order(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"\x00" * 3)
    (tmp_path / "a.txt").write_text("hello")
    files = describe_files(tmp_path, ["b.bin", "a.txt"])
    assert list(files) == ["a.txt", "b.bin"]
    assert files == {"a.txt": {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5},
                     "b.bin": {"sha256": hashlib.sha256(b"\x00" * 3).hexdigest(), "size": 3}}


def test_the_trainable_state_is_a_cpu_copy_on_rank_0_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    adapter = gather_trainable_state_dict(model, full=False, is_main=True)
    assert list(adapter) == ["1.weight", "1.bias"]
    full = gather_trainable_state_dict(model, full=True, is_main=True)
    assert list(full) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name, parameter in model.named_parameters():
        assert torch.equal(full[name], parameter) and full[name].device.type == "cpu"
        assert not full[name].requires_grad
        assert full[name].data_ptr() != parameter.data_ptr()  # a copy: later steps do not change it
    assert gather_trainable_state_dict(model, full=True, is_main=False) == {}


def test_save_weights_writes_an_adapter_or_a_whole_model_with_the_tokenizer(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from finetune_trainer.presets import build_preset

    model, tokenizer = build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    staging = tmp_path / "adapter" / "staging"
    save_weights(peft_model, tokenizer, False, staging, is_main=False)
    assert not (tmp_path / "adapter").exists()  # only rank 0 writes
    save_weights(peft_model, tokenizer, False, staging, is_main=True)
    assert sorted(p.name for p in staging.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
        "tokenizer_config.json"]
    trainable = sum(1 for _, p in peft_model.named_parameters() if p.requires_grad)
    assert len(load_file(staging / "adapter_model.safetensors")) == trainable

    full_model, tokenizer = build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    staging = tmp_path / "full"
    save_weights(full_model, tokenizer, True, staging, is_main=True)
    assert sorted(p.name for p in staging.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


def test_published_weights_are_readable_by_a_server_with_another_uid(tmp_path):
    """safetensors writes 0600; a serving pod of another UID must read every published file."""
    import stat

    staging, output = tmp_path / "staging", tmp_path / "out"
    (staging / "sub").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "sub/tokenizer.json"):
        (staging / name).write_text("w")
        (staging / name).chmod(0o600)
    (staging / "sub").chmod(0o700)
    output.mkdir()
    publish_staged(staging, output)
    for name in ("adapter_model.safetensors", "sub/tokenizer.json"):
        assert stat.S_IMODE((output / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((output / "sub").stat().st_mode) == 0o755


@pytest.mark.parametrize("source,revision,name", [
    ("hf://meta-llama/Llama-3.1-8B-Instruct", "0e9e39f", "meta-llama/Llama-3.1-8B-Instruct"),
    ("preset://tiny-llama", None, None),
    ("/mnt/pvc/models/base", None, None),
])
def test_the_adapter_names_its_base_model_as_a_server_would_load_it(tmp_path, source, revision, name):
    from peft import LoraConfig, PeftConfig, get_peft_model

    from finetune_trainer.config import BaseModelConfig
    from finetune_trainer.presets import build_preset

    model, tokenizer = build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    staging = tmp_path / "staging"
    save_weights(peft_model, tokenizer, False, staging, is_main=True,
                 base_model=BaseModelConfig(source=source, revision=revision))
    # PEFT itself reads it back (the loader vLLM and KServe use for adapters).
    loaded = PeftConfig.from_pretrained(str(staging))
    assert loaded.base_model_name_or_path == name and loaded.revision == revision
