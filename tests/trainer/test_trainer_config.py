import json
import subprocess
import sys
import textwrap

import pytest

from finetune_trainer.config import PRESET_NAMES, JobConfig, dump_config, load_config, parse_config
from finetune_trainer.errors import ConfigError

CONTRACT_EXAMPLE = textwrap.dedent("""
    jobName: support-bot
    jobUid: null
    baseModel:
      source: preset://tiny-llama
      revision: null
      tokenFile: null
      cacheDir: null
      volumeRoot: null
    dataset:
      path: /data/train.jsonl
      volumeRoot: /data
      sha256: null
      format: auto
      validationSplit: 0.05
      skipBadLines: false
    method:
      type: lora
      lora: {r: 16, alpha: 32, dropout: 0.05, targetModules: [all-linear]}
    training: {epochs: 3, maxSteps: null, learningRate: 2.0e-4, microBatchSize: 4, globalBatchSize: 32, maxSeqLength: 2048, packing: true, gradientCheckpointing: true, seed: 42, warmupSteps: 0}
    distributed: {zeroStage: 2, offload: none}
    output:
      dir: /output
    checkpointing: {everySteps: 200, keep: 2, dir: null}
    reporting:
      progressFile: null
      metricsPort: 0
      terminationMessagePath: null
    publish: null
""")

MINIMAL = {"jobName": "j", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d.jsonl"}, "output": {"dir": "/o"}}


def with_field(dotted: str, value):
    config = json.loads(json.dumps(MINIMAL))
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


def test_contract_example_parses_and_round_trips(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    config = load_config(path)
    assert config.method.lora.target_modules == ["all-linear"]
    assert config.training.global_batch_size == 32
    assert str(config.checkpoint_dir) == "/output/checkpoints"
    assert config.reporting.metrics_host == "0.0.0.0"
    # What dump_config renders (camelCase) parses back to the same config.
    assert parse_config(json.loads(dump_config(config))) == config


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("method.lora.r", 0, "method.lora.r: must be >= 1"),
        ("method.type", "prefix", "method.type: must be one of"),
        ("training.learningRate", 0, "training.learningRate: must be > 0"),
        ("dataset.validationSplit", 1.0, "dataset.validationSplit: must be <= 0.5"),
        ("dataset.sha256", "abc", "dataset.sha256: must match ^[a-f0-9]{64}$"),
        ("dataset.sha256", "sha256:" + "a" * 64, "dataset.sha256: must match"),  # one form, as the CRD says,
        ("distributed.zeroStage", 4, "distributed.zeroStage: must be <= 3"),
        ("distributed.offload", "parameters", "distributed.offload: parameters offload needs zeroStage 3"),
        ("training.weightDecay", 2, "training.weightDecay: must be <= 1"),
        ("baseModel.source", "preset://llama-70b", "baseModel.source: unknown preset 'llama-70b'"),
        ("baseModel.source", "models/x", "baseModel.source: 'models/x' must be preset://NAME"),
        ("baseModel.revision", "main", "baseModel.revision: only allowed with an hf:// source"),
        ("reporting.metricsPort", 70000, "reporting.metricsPort: must be <= 65535"),
        ("training.bogus", 1, "training.bogus: unknown field"),
        ("method.lora.targetModules", [], "method.lora.targetModules: must not be empty"),
    ],
)
def test_invalid_values_name_the_field(dotted, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(with_field(dotted, value))
    assert message in str(caught.value)


def test_missing_required_field():
    config = dict(MINIMAL)
    del config["output"]
    with pytest.raises(ConfigError, match="^output: required$"):
        parse_config(config)


def test_hub_source_and_snake_case_names():
    config = parse_config(with_field("baseModel", {"source": "hf://org/name", "revision": "v1"}))
    assert config.base_model.hub_repo_id == "org/name"
    # populate_by_name: Python callers may use field names.
    assert JobConfig(job_name="j", base_model={"source": "/models/x"}, dataset={"path": "/d"}, output={"dir": "/o"})


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobName: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_config(bad)


def test_config_module_imports_without_torch():
    # The operator image has no torch: block it and import what the operator uses.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import finetune_trainer, finetune_trainer.config, finetune_trainer.protocol\n"
        "print(finetune_trainer.config.PRESET_NAMES)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "tiny-llama" in result.stdout


def test_presets_listed_in_config_match_implementation():
    from finetune_trainer.presets import PRESET_SHAPES

    assert set(PRESET_SHAPES) == set(PRESET_NAMES)


@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_deepspeed_config_leaves_bf16_overflow_to_the_trainer_and_fuses_adam_on_gpus(offload):
    import torch
    from finetune_trainer.batching import StepPlan
    from finetune_trainer.engine import deepspeed_config

    config = JobConfig.model_validate({**MINIMAL, "distributed": {"zeroStage": 2, "offload": offload}})
    plan = StepPlan(num_rows=64, micro_batch_size=4, global_batch_size=32, world_size=1, epochs=1, max_steps=None, seed=0)
    gpu = deepspeed_config(config, plan, torch.device("cuda", 0))
    cpu = deepspeed_config(config, plan, torch.device("cpu"))
    # train.check_finite stops a diverged run instead (DeepSpeed's check costs a read-back per step)
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert cpu["bf16"]["enabled"] is False
    # torch's fused AdamW where the update runs on the GPU; DeepSpeed's CPU Adam with offload
    assert gpu["optimizer"]["params"].get("fused") is (True if offload == "none" else None)
    assert "fused" not in cpu["optimizer"]["params"]
    assert gpu["gradient_accumulation_steps"] == 8


@pytest.mark.parametrize("steps_per_epoch,epochs", [
    (16, 3),      # what auto batching aims at: 3 epochs, 48 steps
    (3, 16),      # a small dataset: enough epochs for 48 steps
    (1, 25),      # at most 25 epochs
    (600, 3),     # 1,800 steps: still 3
    (700, 2),     # 2,100 would be over 2,000 steps: 2 epochs
    (5000, 1),    # never less than one
    (0, 3),       # no step fits: StepPlan.validate's error, not this one's
])
def test_auto_epochs_aim_at_48_to_2000_steps_within_1_and_25_epochs(steps_per_epoch, epochs):
    from finetune_trainer.batching import auto_epochs

    assert auto_epochs(steps_per_epoch) == epochs


def test_step_plan_for_rows_chooses_the_batch_then_the_epochs_and_keeps_explicit_values():
    from finetune_trainer.batching import StepPlan
    from finetune_trainer.config import TrainingConfig

    auto = StepPlan.for_rows(TrainingConfig(micro_batch_size=2), num_rows=7, world_size=1)
    assert (auto.global_batch_size, auto.epochs, auto.total_steps) == (2, 16, 48)
    fixed = StepPlan.for_rows(TrainingConfig(micro_batch_size=2, global_batch_size=4, epochs=2), num_rows=7, world_size=1)
    assert (fixed.global_batch_size, fixed.epochs, fixed.total_steps) == (4, 2, 2)
    capped = StepPlan.for_rows(TrainingConfig(micro_batch_size=2, max_steps=5), num_rows=7, world_size=1)
    assert capped.total_steps == 5


@pytest.mark.parametrize("value", [0, 1001, "three", 2.5, None])
def test_epochs_take_an_integer_from_1_to_1000_or_auto_with_one_message(value):
    from pydantic import ValidationError

    from finetune_trainer.config import TrainingConfig

    with pytest.raises(ValidationError) as caught:
        TrainingConfig(epochs=value)
    (error,) = caught.value.errors()
    assert error["loc"] == ("epochs",) and "must be an integer from 1 to 1000, or auto" in error["msg"]


@pytest.mark.parametrize("rows,micro,world,chosen", [
    (7, 2, 1, 2),        # too few rows for 16 steps: one micro-batch per process
    (19, 4, 1, 4),
    (1000, 4, 1, 32),    # at most 32 rows a step
    (300, 4, 1, 16),     # 300 // 16 = 18 -> 16, a multiple of the micro-batch: 18 steps an epoch
    (300, 4, 8, 32),     # 8 processes: one micro-batch each is 32
    (100, 4, 16, 64),    # 16 processes: never less than one micro-batch each (64 > 32)
])
def test_auto_global_batch_aims_at_sixteen_steps_an_epoch_within_one_micro_batch_and_32(rows, micro, world, chosen):
    from finetune_trainer.batching import StepPlan, auto_global_batch

    assert auto_global_batch(rows, micro, world) == chosen
    plan = StepPlan(num_rows=rows, micro_batch_size=micro, global_batch_size=chosen, world_size=world, epochs=1,
                    max_steps=None, seed=0)
    if rows >= micro * world:
        plan.validate()  # a whole number of micro-batches per process, at least one step
