"""End-to-end runs of `finetune-trainer` on the tiny preset (CPU, one process)."""

import hashlib
import json
import re
import shutil

import pytest
from hub_layout import save_as_hub_cache

from finetune_trainer.protocol import OWNER_FILE, PROGRESS_EVENT
from trainer_helpers import (
    arithmetic_chat, assert_ok, make_config, read_progress, run_trainer, write_config, write_jsonl,
)

import torch
import deepspeed  # noqa: F401  (a broken install fails, never skips)


def train(tmp_path, dataset, **overrides):
    config = make_config(tmp_path, dataset, **overrides)
    result = run_trainer(write_config(tmp_path, config))
    assert_ok(result)
    return config, json.loads((tmp_path / "out" / "result.json").read_text())


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_loss_goes_down_and_outputs_are_complete(tmp_path, chat_dataset, method):
    publish = {"name": "m", "uri": "pvc://models/m", "baseModel": {"source": "preset://tiny-llama"},
               "dataset": {"source": "pvc://data/train.jsonl"}, "sourceJob": {"name": "test", "uid": "u-1"}}
    termination = tmp_path / "termination-log"
    config, result = train(
        tmp_path, chat_dataset, **{"method.type": method, "publish": publish,
                                   "reporting.terminationMessagePath": str(termination)}
    )
    out = tmp_path / "out"
    metrics = result["metrics"]
    assert metrics["evalLoss"] < metrics["initialEvalLoss"] - 0.3, metrics
    assert metrics["steps"] == 3 * (43 // 4)  # 48 examples - 5 validation, packed one per row at 128 tokens
    assert metrics["tokens"] > 0 and metrics["trainLoss"] > 0

    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    expected = {weights, "tokenizer.json", "tokenizer_config.json", "model.yaml"}
    expected |= {"config.json"} if method == "full" else {"adapter_config.json"}
    assert expected <= set(result["files"])
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {"result.json", OWNER_FILE}  # the owner file: whose dir
    assert set(result["files"]) == on_disk
    for name, entry in result["files"].items():
        assert entry == {"sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(), "size": (out / name).stat().st_size}

    import yaml

    model_yaml = yaml.safe_load((out / "model.yaml").read_text())
    adapter = model_yaml["spec"]["adapter"]
    assert adapter["uri"] == "pvc://models/m" and adapter["format"] == ("full" if method == "full" else "peft")
    assert adapter["sha256"] == result["files"][weights]["sha256"]
    assert model_yaml["spec"]["runPlan"] == result["runPlan"]
    assert model_yaml["status"]["metrics"]["evalLoss"] == metrics["evalLoss"]
    assert json.loads(termination.read_text()) == result

    progress = read_progress(tmp_path / "progress.jsonl")
    steps = [r for r in progress if r["event"] == "progress"]
    assert [r["step"] for r in steps] == list(range(1, metrics["steps"] + 1))
    assert {"totalSteps", "loss", "tokensPerSecond", "eta", "learningRate", "tokensSeen"} <= set(steps[0])
    assert progress[-1]["event"] == "finished"


def test_lora_adapter_loads_with_peft_and_changes_outputs(tmp_path, chat_dataset):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from finetune_trainer import presets

    train(tmp_path, chat_dataset)
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    base, _ = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        before = base(**inputs).logits
    tuned = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        after = tuned(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-3)
    # A preset has no name a server could load: none is recorded (model.yaml keeps the source).
    assert tuned.peft_config["default"].base_model_name_or_path is None
    # The tuned model has picked up the answer format ("<a> plus <b> is <sum>.").
    generated = tuned.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert re.match(r"\d+ plu", tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:]))


def test_stdout_progress_lines(tmp_path, chat_dataset):
    """Without progressFile, progress goes to stdout as prefixed JSON lines."""
    from trainer_helpers import PROGRESS_PREFIX

    config = make_config(tmp_path, chat_dataset, **{"reporting": {}, "training.maxSteps": 2})
    result = run_trainer(write_config(tmp_path, config))
    assert_ok(result)
    records = [json.loads(line[len(PROGRESS_PREFIX):]) for line in result.stdout.splitlines()
               if line.startswith(PROGRESS_PREFIX)]
    assert [r["step"] for r in records if r["event"] == "progress"] == [1, 2]
    assert "step 2/2" in result.stderr  # the human-readable line


def test_bad_data_exits_2_and_leaves_no_result(tmp_path):
    dataset = write_jsonl(tmp_path / "bad.jsonl", [*arithmetic_chat(3), "{broken"])
    config = make_config(tmp_path, dataset)
    out = tmp_path / "out"
    out.mkdir()
    (out / OWNER_FILE).write_text(json.dumps({"jobName": "test", "jobUid": None}))  # this job's directory ...
    (out / "result.json").write_text('{"stale": true}')  # ... with a result from an earlier attempt
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"finetune-trainer: error: {dataset}:4: not valid JSON (Expecting property name enclosed in "
        "double quotes) (set dataset.skipBadLines to skip bad lines)"
    )
    assert "Traceback" not in result.stderr
    assert not (out / "result.json").exists()


def test_bad_config_exits_2_with_one_line(tmp_path, chat_dataset):
    config = make_config(tmp_path, chat_dataset, **{"method.lora.r": 0})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2
    assert result.stderr.strip() == "finetune-trainer: error: method.lora.r: must be >= 1"
    assert not (tmp_path / "out").exists()


def test_dataset_too_small_for_batch_is_a_clear_error(tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_chat(4))
    config = make_config(tmp_path, dataset, **{"training.globalBatchSize": 8})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2, result.stderr
    assert "dataset: only 3 training row(s), fewer than training.globalBatchSize=8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "result.json").exists()


def test_qlora_on_cpu_is_a_clear_error(tmp_path, chat_dataset):
    termination = tmp_path / "termination-log"
    config = make_config(tmp_path, chat_dataset, **{"method.type": "qlora",
                                                    "reporting.terminationMessagePath": str(termination)})
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "finetune-trainer: error: method.type: qlora needs a CUDA GPU"
    )
    assert json.loads(termination.read_text())["exitCode"] == 2
    assert not (tmp_path / "out" / "result.json").exists()


def test_prompt_completion_data_with_skipped_lines_no_packing(tmp_path):
    records = [{"prompt": f"{i} doubled is ", "completion": str(2 * i)} for i in range(40)]
    dataset = write_jsonl(tmp_path / "pc.jsonl", [*records, "not json", {"prompt": 1}])
    _, result = train(tmp_path, dataset, **{"dataset.skipBadLines": True, "training.packing": False,
                                            "training.maxSteps": 4, "distributed.zeroStage": 2})
    assert result["metrics"]["skippedLines"] == 2
    assert result["metrics"]["steps"] == 4


def test_hub_source_from_offline_cache_and_local_directory(tmp_path, chat_dataset):
    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = save_as_hub_cache(cache, "acme/tiny", commit)
    token_file = tmp_path / "token"
    token_file.write_text("hf_secret_value\n")
    steps = {"training.maxSteps": 3}

    hub = {"source": "hf://acme/tiny", "revision": "main", "tokenFile": str(token_file), "cacheDir": str(cache)}
    config = make_config(tmp_path, chat_dataset, baseModel=hub, **steps)
    result = run_trainer(write_config(tmp_path, config))  # HF_HUB_OFFLINE=1
    assert_ok(result)
    assert "hf_secret_value" not in result.stdout + result.stderr
    hub_result = json.loads((tmp_path / "out" / "result.json").read_text())
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # The hub id and revision, as PEFT, vLLM and KServe resolve a base model (not our URI).
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("acme/tiny", "main")

    # The same weights from a plain directory train identically.
    local = tmp_path / "local-model"
    shutil.copytree(snapshot, local)
    config = make_config(tmp_path, chat_dataset, baseModel={"source": str(local)},
                         **{**steps, "output.dir": str(tmp_path / "out-local")})
    assert_ok(run_trainer(write_config(tmp_path, config)))
    local_result = json.loads((tmp_path / "out-local" / "result.json").read_text())
    assert local_result["metrics"]["evalLoss"] == pytest.approx(hub_result["metrics"]["evalLoss"], rel=1e-5)

    # A revision missing from the cache, offline: a clear error.
    config = make_config(tmp_path, chat_dataset, baseModel={**hub, "revision": "v2"}, **steps)
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2
    assert "baseModel.source: hf://acme/tiny (revision v2) is not in the local cache" in result.stderr


def test_diverged_training_fails_clearly_and_saves_nothing(tmp_path, chat_dataset):
    # Adam moves every weight by about the learning rate each step, whatever the gradients: at
    # the largest rate a job may set (1.0) and without clipping, LoRA's loss turns NaN within
    # 16 steps here (a full fine-tune stayed finite for 20).
    config = make_config(tmp_path, chat_dataset, **{
        "training.learningRate": 1.0, "training.maxGradNorm": 0, "training.maxSteps": 40,
    })
    result = run_trainer(write_config(tmp_path, config))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"finetune-trainer: error: training diverged at step \d+: loss \S+, gradient norm \S+; "
        r"lower training.learningRate \(now 1\) and rerun", last
    ), last
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not (out / "result.json").exists() and not list(out.glob("*.safetensors"))


def test_eval_loss_is_the_saved_models_loss_on_the_held_out_examples(tmp_path, chat_dataset):
    """Recomputed here from the saved weights, one example at a time without packing: on the
    examples the split held out it is the reported evalLoss; on the training examples it is not
    (an eval over training rows would pass every "loss goes down" check)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import data

    config, result = train(tmp_path, chat_dataset, **{"method.type": "full"})
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    records = [json.loads(line) for line in chat_dataset.read_text().splitlines()]
    sequences = data.tokenize_all(records, "chat", tokenizer, config["training"]["maxSeqLength"])
    trained_on, held_out = data.split(sequences, config["dataset"]["validationSplit"], config["training"]["seed"])
    assert len(held_out) == 5 and not {tuple(s.input_ids) for s in held_out} & {tuple(s.input_ids) for s in trained_on}

    def loss_per_target_token(examples):
        total = targets = 0.0
        with torch.no_grad():
            for example in examples:
                logits = model(torch.tensor([example.input_ids])).logits[0, :-1]
                labels = torch.tensor(example.labels[1:])
                total += F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").item()
                targets += (labels != -100).sum().item()
        return total / targets

    reported = result["metrics"]["evalLoss"]
    assert loss_per_target_token(held_out) == pytest.approx(reported, rel=1e-3)
    assert loss_per_target_token(trained_on) != pytest.approx(reported, rel=1e-2)


def test_auto_batch_and_epochs_train_a_dataset_the_old_defaults_refused(tmp_path):
    """globalBatchSize and epochs auto (the defaults): 7 packed rows, which the old fixed batch
    size (32) refused, train with one micro-batch per step, and for enough epochs to make the
    run 48 steps rather than 3 epochs' 9; the choices are in the run plan and in every
    progress record (which the operator copies into the job's status)."""
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_chat(8))
    config = make_config(tmp_path, dataset, **{"training.globalBatchSize": "auto", "training.epochs": "auto"})
    assert_ok(run_trainer(write_config(tmp_path, config)))
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    plan = result["runPlan"]
    assert (plan["globalBatchSize"], plan["accumulationSteps"]) == (2, 1)  # microBatchSize 2, one process
    assert plan["epochs"] == 16  # 3 steps an epoch: 16 epochs reach the 48 steps auto aims at
    assert result["metrics"]["steps"] == plan["totalSteps"] == 16 * (7 // 2)
    assert plan["deepspeed"]["train_batch_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == PROGRESS_EVENT]
    assert steps and all((r["globalBatchSize"], r["epochs"]) == (2, 16) for r in steps)
