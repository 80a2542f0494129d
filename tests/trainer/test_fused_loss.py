"""Fused linear + cross-entropy: where it is used, that it leaves the loss and gradients as
they were, and that it gives back the logits' memory (GPU tests, run on the device machine)."""

import copy

import pytest
import torch

from finetune_trainer import activation_memory, adapters, attention, batching, fused_loss, presets
from finetune_trainer.config import MethodConfig
from trainer_helpers import random_sequences


def test_used_on_gpus_below_zero_3():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_loss.wanted(gpu, 0) and fused_loss.wanted(gpu, 2)
    assert not fused_loss.wanted(gpu, 3) and not fused_loss.wanted(cpu, 2)


def test_patches_only_the_loss_and_evaluates_as_before():
    """Outside training the fused forward computes logits and the usual loss: same numbers,
    and none of Liger's other kernels (RMSNorm, SwiGLU, RoPE) swapped in."""
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model.eval()
    collate = batching.Collator(tokenizer, packing=True, flatten=False)
    batch = collate([random_sequences([12, 30], model.config.vocab_size, seed=5)], torch.device("cpu"))
    modules_before = [type(m) for m in model.modules()]
    with torch.no_grad():
        expected = model(**batch).loss
        assert fused_loss.apply(model)
        fused = model(**batch).loss
    assert "forward" in vars(model)
    assert [type(m) for m in model.modules()] == modules_before
    torch.testing.assert_close(fused, expected)


def test_an_architecture_liger_does_not_cover_is_left_as_it_is():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not fused_loss.apply(model)
    assert "forward" not in vars(model)


def _gpu_model(device, preset="tiny-llama"):
    model, tokenizer = presets.build_preset(preset, torch.bfloat16, device)
    attention.register()
    model.config._attn_implementation = attention.choose(device)
    return model, tokenizer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_loss_and_gradients_match_the_unfused_model(method):
    device = torch.device("cuda")
    reference, tokenizer = _gpu_model(device)
    fused = copy.deepcopy(reference)
    assert fused_loss.apply(fused)
    config = MethodConfig(type=method)
    torch.manual_seed(0)  # the same adapter init in both
    reference = adapters.prepare_for_training(reference, config, enable_checkpointing=False)
    torch.manual_seed(0)
    fused = adapters.prepare_for_training(fused, config, enable_checkpointing=False)
    flatten = attention.flattens(reference.config._attn_implementation)
    collate = batching.Collator(tokenizer, packing=True, flatten=flatten)
    vocab = reference.config.vocab_size
    rows = [random_sequences([40, 300, 7], vocab, seed=1), random_sequences([500], vocab, seed=2)]
    losses = []
    for model in (reference, fused):
        model.train()
        output = model(**collate(rows, device))
        assert (output.logits is None) == (model is fused)  # the fused kernel made no logits
        output.loss.backward()
        losses.append(output.loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
    # LoRA's B starts at zero, so A's first gradient is zero in both: compare the others.
    pairs = [(r, f) for r, f in zip(reference.parameters(), fused.parameters()) if r.grad is not None and r.grad.any()]
    assert pairs
    for r, f in pairs:
        cosine = torch.nn.functional.cosine_similarity(r.grad.float().flatten(), f.grad.float().flatten(), dim=0)
        assert cosine > 0.99, cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_probe_sees_the_logits_memory_given_back():
    """On a 128k vocabulary the fused loss lowers the planner's measured peak by GiBs."""
    device = torch.device("cuda")
    peaks = []
    for fuse in (False, True):
        model, tokenizer = _gpu_model(device, "llama-1b")
        if fuse:
            assert fused_loss.apply(model)
        model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=True)
        flatten = attention.flattens(model.config._attn_implementation)
        collate = batching.Collator(tokenizer, packing=True, flatten=flatten)
        rows = activation_memory.synthetic_rows(8192, 2048, model.config.vocab_size)
        peak_all, _ = activation_memory.measure(model, collate, rows, device)
        peaks.append(peak_all)
        del model
        torch.cuda.empty_cache()
    assert peaks[0] - peaks[1] > 2 * 2**30, [p / 2**30 for p in peaks]
