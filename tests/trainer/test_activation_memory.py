"""Gradient checkpointing only where memory needs it."""

import pytest
import torch

from finetune_trainer import activation_memory, adapters, attention, batching, presets
from finetune_trainer.activation_memory import ActivationProfile, layers_to_checkpoint
from finetune_trainer.config import MethodConfig, parse_config

GiB = 2**30


def _config(**training):
    return parse_config({
        "jobName": "t", "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"path": "/d.jsonl"},
        "output": {"dir": "/o"}, "training": training,
    })


def test_no_layer_is_checkpointed_when_everything_fits():
    profile = ActivationProfile(fixed_bytes=1 * GiB, per_token_bytes=4 * 2**20, per_token_bytes_checkpointed=2**20)
    assert layers_to_checkpoint(profile, tokens=4096, budget_bytes=20 * GiB, layers=32) == 0


def test_the_fewest_layers_that_fit_are_checkpointed():
    # 32 layers; 4 MiB/token without checkpointing, 1 MiB/token with: each layer saves 3/32 MiB/token.
    profile = ActivationProfile(fixed_bytes=0, per_token_bytes=4 * 2**20, per_token_bytes_checkpointed=2**20)
    count = layers_to_checkpoint(profile, tokens=8192, budget_bytes=24 * GiB, layers=32)
    per_layer = 3 * 2**20 / 32
    assert 8192 * (4 * 2**20 - count * per_layer) <= 24 * GiB
    assert 8192 * (4 * 2**20 - (count - 1) * per_layer) > 24 * GiB
    assert 0 < count < 32


def test_every_layer_when_even_full_checkpointing_does_not_fit():
    profile = ActivationProfile(fixed_bytes=0, per_token_bytes=4 * 2**20, per_token_bytes_checkpointed=2**20)
    assert layers_to_checkpoint(profile, tokens=8192, budget_bytes=1 * GiB, layers=32) == 32


def test_engine_reserve_partitions_optimizer_state_from_zero_1():
    assert activation_memory.engine_reserve_bytes(10**9, 0, 4, offload=False) == pytest.approx(12e9 + 2e9)
    assert activation_memory.engine_reserve_bytes(10**9, 2, 4, offload=False) == pytest.approx(3e9 + 2e9)
    assert activation_memory.engine_reserve_bytes(10**9, 2, 4, offload=True) == pytest.approx(2e9)


@pytest.mark.parametrize(("setting", "expected"), [(True, 2), (False, 0), (None, 0)])
def test_explicit_settings_win_and_auto_is_off_on_cpu(setting, expected):
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=setting is not False)
    collate = batching.Collator(tokenizer, packing=True, flatten=False)
    config = _config(gradientCheckpointing=setting)
    count = activation_memory.plan(model, collate, config, [100, 200], 1, torch.device("cpu"))
    assert count == expected
    flags = [layer.gradient_checkpointing for layer in activation_memory.checkpointable_layers(model)]
    assert flags == [True] * expected + [False] * (2 - expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_profile_predicts_the_peak_of_a_larger_batch():
    device = torch.device("cuda")
    model, tokenizer = presets.build_preset("llama-1b", torch.bfloat16, device)
    attention_name = attention.choose(device)
    model.config._attn_implementation = attention_name
    model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=True)
    collate = batching.Collator(tokenizer, packing=True, flatten=attention.flattens(attention_name))
    vocab = model.get_input_embeddings().weight.shape[0]
    profile = activation_memory.profile(model, collate, 2048, 1024, vocab, device)
    assert profile.per_token_bytes > profile.per_token_bytes_checkpointed > 0
    layers = len(activation_memory.checkpointable_layers(model))
    for count in (0, layers // 2):
        activation_memory.set_checkpointed_layers(model, count)
        measured = activation_memory._peak_bytes(model, collate, 8192, 2048, vocab, device)
        saved_per_layer = (profile.per_token_bytes - profile.per_token_bytes_checkpointed) / layers
        predicted = profile.fixed_bytes + 8192 * (profile.per_token_bytes - count * saved_per_layer)
        assert abs(predicted - measured) / measured < 0.15, (count, predicted / GiB, measured / GiB)
