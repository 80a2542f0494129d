"""The run plan (planning.py) and the token-weighted step loss.

- result.json's runPlan says what ran, and an override changes both the plan and the run: a
  probe script records the model and engine as train.run built them and compares;
- the step loss is the mean over the step's target tokens (the eval loss's estimator), not a
  mean of micro-batch means, and its gradient is that mean's gradient, with one process and two.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_helpers import (
    TORCHRUN, assert_ok, free_port, make_config, random_sequences, read_progress, run_trainer, trainer_env,
    write_config, write_jsonl,
)

import torch
import deepspeed  # noqa: F401  (a broken install fails, never skips)

PROBE = Path(__file__).with_name("run_probe.py")
TINY_LLAMA_LAYERS = 2


def run_probe(*args: str, nproc: int = 1, timeout: float = 300) -> dict:
    if nproc == 1:
        command = [sys.executable, str(PROBE), *args]
    else:
        command = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), str(PROBE), *args]
    result = subprocess.run(command, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    assert_ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stdout[-3000:]
    return json.loads(lines[0].removeprefix("PROBE "))


def test_result_json_has_the_plan_that_ran_and_the_log_has_it_once(tmp_path, chat_dataset):
    config = make_config(tmp_path, chat_dataset, **{"training.maxSteps": 2})
    result = run_trainer(write_config(tmp_path, config))
    assert_ok(result)
    plan = json.loads((tmp_path / "out" / "result.json").read_text())["runPlan"]
    assert plan["device"] == "cpu" and plan["precision"] == "fp32" and plan["worldSize"] == 1
    assert plan["attention"] == "sdpa" and plan["compile"] is False and plan["fusedLoss"] is False
    assert plan["layers"] == TINY_LLAMA_LAYERS
    assert plan["checkpointedLayers"] == TINY_LLAMA_LAYERS  # gradientCheckpointing: true
    assert plan["microBatchSize"] == 2 and plan["accumulationSteps"] == 2 and plan["totalSteps"] == 2
    assert plan["zeroStage"] == 0 and plan["offload"] == "none"
    assert plan["deepspeed"]["gradient_accumulation_steps"] == 2
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 0
    logged = [line for line in result.stderr.splitlines() if "run plan: " in line]
    assert len(logged) == 1, logged
    assert json.loads(logged[0].split("run plan: ", 1)[1]) == plan


def test_an_override_changes_the_plan_and_the_run(tmp_path, chat_dataset):
    def probe(name: str, overrides: dict, gradient_checkpointing: bool | None) -> dict:
        config = make_config(tmp_path, chat_dataset, **{
            "training.maxSteps": 1, "training.gradientCheckpointing": gradient_checkpointing,
            "output.dir": str(tmp_path / name), "reporting.progressFile": str(tmp_path / f"{name}.jsonl"),
        })
        seen = run_probe("run", str(write_config(tmp_path, config, f"{name}.json")), json.dumps(overrides))
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert seen["plan"] == result["runPlan"]
        return seen

    default = probe("default", {}, gradient_checkpointing=None)
    # The override wins over the job's gradientCheckpointing: false too.
    overridden = probe("overridden", {
        "attention": "finetune_varlen", "checkpointedLayers": 1, "deepspeed": {"gradient_clipping": 0.25},
    }, gradient_checkpointing=False)
    # Unset on CPU, the trainer checkpoints nothing and pads rows for SDPA.
    assert default["plan"]["checkpointedLayers"] == 0 and default["plan"]["attention"] == "sdpa"
    assert default["built"] == {"attention": "sdpa", "checkpointed": [False, False], "flatten": False,
                                "gradientClipping": 1.0}
    assert overridden["plan"]["checkpointedLayers"] == 1 and overridden["plan"]["attention"] == "finetune_varlen"
    assert overridden["plan"]["deepspeed"]["gradient_clipping"] == 0.25
    assert overridden["built"] == {"attention": "finetune_varlen", "checkpointed": [True, False], "flatten": True,
                                   "gradientClipping": 0.25}


def test_deepspeed_override_merges_into_nested_objects_and_none_removes_a_key():
    from finetune_trainer.planning import merged

    base = {"bf16": {"enabled": True, "check_grad_overflow": False}, "optimizer": {"params": {"lr": 1, "fused": True}}}
    assert merged(base, {"bf16": {"check_grad_overflow": None}, "optimizer": {"params": {"fused": None}}, "x": 1}) == {
        "bf16": {"enabled": True}, "optimizer": {"params": {"lr": 1}}, "x": 1,
    }
    assert base["bf16"]["check_grad_overflow"] is False  # the planned config is left as it was


@pytest.mark.parametrize("flatten", [False, True])
def test_count_targets_counts_what_the_model_loss_averages_over(flatten):
    """The causal LM loss shifts labels by one; the count must match it in padded, packed and
    flattened micro-batches (flattened rows run the CPU reference varlen attention)."""
    from finetune_trainer import attention, batching, presets

    attention.register()
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model.config._attn_implementation = attention.PACKED_ATTENTION if flatten else "sdpa"
    vocab = model.config.vocab_size
    rows = [random_sequences([5, 40], vocab, seed=1), random_sequences([9], vocab, seed=2)]
    per_sequence_sum = 0.0
    for row in rows:
        for s in row:
            logits = model(torch.tensor([s.input_ids])).logits[0]
            per_sequence_sum += torch.nn.functional.cross_entropy(
                logits[:-1], torch.tensor(s.labels[1:]), ignore_index=-100, reduction="sum").item()
    for packing in ([True, False] if not flatten else [True]):
        collate = batching.Collator(tokenizer, packing=packing, flatten=flatten)
        batch_rows = rows if packing else [[s] for row in rows for s in row]
        mean = model(**collate(batch_rows, torch.device("cpu"))).loss.item()
        assert mean * batching.count_targets(batch_rows) == pytest.approx(per_sequence_sum, rel=1e-5)


def unequal_texts(n: int) -> list[dict]:
    """Examples of very different lengths, so micro-batches hold very different target counts."""
    return [{"text": " ".join(["seven"] * (2 if i % 2 else 60)) + f" {i}"} for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_step_loss_is_the_mean_over_the_steps_target_tokens(tmp_path, packing):
    """At step 1 the LoRA model is the base model (lora_B starts at zero), so the reported loss
    can be computed directly, per token, from the base model and the step's rows."""
    from finetune_trainer import batching, data, presets
    from finetune_trainer.config import JobConfig

    dataset = write_jsonl(tmp_path / "train.jsonl", unequal_texts(16))
    config = make_config(tmp_path, dataset, **{
        "dataset.validationSplit": 0, "training.maxSteps": 1, "training.packing": packing,
        "training.microBatchSize": 1, "training.globalBatchSize": 4,
        "training.maxSeqLength": 128 if packing else 64,
    })
    assert_ok(run_trainer(write_config(tmp_path, config)))
    reported = next(r["loss"] for r in read_progress(tmp_path / "progress.jsonl") if r["event"] == "progress")

    job = JobConfig.model_validate(config)
    records, fmt, _ = data.read_examples(job.dataset)
    sequences = data.tokenize_all(records, fmt, presets.build_tokenizer(), job.training.max_seq_length)
    train_sequences, _ = data.split(sequences, 0, job.training.seed)
    rows = data.pack_rows(train_sequences, job.training.max_seq_length, packing, job.training.seed)
    steps = batching.StepPlan(num_rows=len(rows), micro_batch_size=1, global_batch_size=4, world_size=1,
                              epochs=1, max_steps=1, seed=job.training.seed)
    model, _ = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    sums, targets = [], []
    with torch.no_grad():
        for index in steps.step_rows(0):  # one row per micro-batch
            row_sum = row_targets = 0
            for s in rows[index]:
                logits = model(torch.tensor([s.input_ids])).logits[0]
                labels = torch.tensor(s.labels[1:])
                row_sum += torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
                row_targets += int((labels != -100).sum())
            sums.append(row_sum)
            targets.append(row_targets)
    token_mean = sum(sums) / sum(targets)
    mean_of_means = sum(s / t for s, t in zip(sums, targets)) / len(sums)
    assert max(targets) > 3 * min(targets), targets  # the data does separate the two estimators
    assert abs(token_mean - mean_of_means) > 1e-3, (token_mean, mean_of_means)
    assert reported == pytest.approx(token_mean, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("nproc", [1, 2])
def test_step_gradient_is_the_gradient_of_the_token_mean(tmp_path, nproc):
    """train.train_step under a real DeepSpeed engine (ZeRO-2, which reports the gradient norm
    it saw before clipping) against autograd on the token-mean loss of the same rows. Two
    micro-batches per process, of very different target counts."""
    seen = run_probe("gradient", str(tmp_path), nproc=nproc)
    assert seen["engineNorm"] == pytest.approx(seen["tokenMeanNorm"], rel=1e-4)
    assert abs(seen["meanOfMeansNorm"] - seen["tokenMeanNorm"]) > 1e-2 * seen["tokenMeanNorm"]
    assert seen["loss"] == pytest.approx(seen["tokenMean"], rel=1e-5)
