"""Gradient checkpointing only where memory needs it."""

import pytest
import torch

from finetune_trainer import activation_memory, adapters, attention, batching, presets
from finetune_trainer.activation_memory import layers_to_checkpoint
from finetune_trainer.config import MethodConfig, parse_config

GiB = 2**30


def _config(**training):
    return parse_config({
        "jobName": "t", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d.jsonl"},
        "output": {"dir": "/o"}, "training": training,
    })


def test_no_layer_is_checkpointed_when_everything_fits():
    assert layers_to_checkpoint(32, peak_all=10 * GiB, other=(0, 30 * GiB), budget_bytes=40 * GiB) == 0


def test_the_fewest_layers_that_fit_are_checkpointed():
    # 10 GiB with all 32 checkpointed, 42 GiB with none: each layer checkpointed saves 1 GiB.
    assert layers_to_checkpoint(32, peak_all=10 * GiB, other=(0, 42 * GiB), budget_bytes=30 * GiB) == 12
    # The same line measured from the half-checkpointed point (none ran out of memory).
    assert layers_to_checkpoint(32, peak_all=10 * GiB, other=(16, 26 * GiB), budget_bytes=30 * GiB) == 12


def test_every_layer_when_fewer_ran_out_of_memory_or_nothing_fits():
    assert layers_to_checkpoint(32, peak_all=10 * GiB, other=None, budget_bytes=80 * GiB) == 32
    assert layers_to_checkpoint(32, peak_all=10 * GiB, other=(0, 42 * GiB), budget_bytes=5 * GiB) == 32


def test_engine_reserve_partitions_optimizer_state_from_zero_1():
    reserve = activation_memory.engine_reserve_bytes
    buckets = activation_memory.ENGINE_BUCKET_BYTES
    assert reserve(10**9, 0, 4, offload=False, accumulates=False) == pytest.approx(12e9 + buckets)
    assert reserve(10**9, 2, 4, offload=False, accumulates=False) == pytest.approx(3e9 + buckets)
    assert reserve(10**9, 2, 4, offload=True, accumulates=False) == pytest.approx(buckets)


def test_engine_reserve_holds_the_accumulated_gradients_between_micro_batches():
    reserve = activation_memory.engine_reserve_bytes
    buckets = activation_memory.ENGINE_BUCKET_BYTES
    assert reserve(10**9, 2, 4, offload=False, accumulates=True) == pytest.approx(3e9 + 2e9 + buckets)
    assert reserve(10**9, 2, 1, offload=False, accumulates=True) == pytest.approx(14e9 + buckets)
    # Offloaded, DeepSpeed accumulates on the CPU.
    assert reserve(10**9, 2, 4, offload=True, accumulates=True) == pytest.approx(buckets)


@pytest.mark.parametrize(("setting", "expected"), [(True, 2), (False, 0), (None, 0)])
def test_explicit_settings_win_and_auto_is_off_on_cpu(setting, expected):
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=setting is not False)
    collate = batching.Collator(tokenizer, packing=True, flatten=False)
    config = _config(gradientCheckpointing=setting)
    steps = batching.StepPlan(num_rows=2, micro_batch_size=4, global_batch_size=32, world_size=1, epochs=1,
                              max_steps=None, seed=0)
    assert activation_memory.plan(model, collate, config, [100, 200], steps, torch.device("cpu")) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_is_linear_in_checkpointed_layers():
    """The plan interpolates between two measured counts; check a third against the line."""
    device = torch.device("cuda")
    model, tokenizer = presets.build_preset("llama-1b", torch.bfloat16, device)
    attention_name = attention.choose(device)
    attention.register()
    model.config._attn_implementation = attention_name
    model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=True)
    collate = batching.Collator(tokenizer, packing=True, flatten=attention.flattens(attention_name))
    rows = activation_memory.synthetic_rows(8192, 2048, model.get_input_embeddings().weight.shape[0])
    peak_all, other = activation_memory.measure(model, collate, rows, device)
    layers = len(activation_memory.checkpointable_layers(model))
    assert other is not None and other[0] == 0 and other[1] > peak_all
    activation_memory.set_checkpointed_layers(model, layers // 4)
    measured = activation_memory.peak_bytes(model, collate, rows, device)
    predicted = peak_all + (layers - layers // 4) * (other[1] - peak_all) / layers
    assert abs(predicted - measured) / measured < 0.10, (predicted / GiB, measured / GiB)
