"""Padding-free packed attention: a flattened micro-batch trains exactly like its examples
run one at a time.

On CPU the registered attention takes its reference path, so these tests check what the
trainer controls: the collator's flattening, the boundaries reaching every attention call,
position ids and labels. The CUDA test checks PyTorch's varlen kernel against the reference
(run on the device machine; skipped here).
"""

import pytest
import torch
import torch.nn.functional as F

from finetune_trainer import attention, batching, presets
from finetune_trainer.data import IGNORE_INDEX
from trainer_helpers import random_sequences


def _per_example_loss_sum(model, sequences):
    """Summed token losses of each example run alone (no packing, no padding), and token count."""
    total, count = 0.0, 0
    for s in sequences:
        logits = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0, :-1]
        targets = torch.tensor(s.labels[1:])
        total += F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def test_flattened_micro_batch_matches_examples_run_alone():
    attention.register()
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model.config._attn_implementation = attention.PACKED_ATTENTION
    vocab = model.config.vocab_size
    rows = [random_sequences([7, 19, 3], vocab, seed=1), random_sequences([31, 5], vocab, seed=2)]
    collate = batching.Collator(tokenizer, packing=True, flatten=True)

    inputs = collate(rows, torch.device("cpu"))
    assert inputs["input_ids"].shape == (1, 7 + 19 + 3 + 31 + 5)  # not a single pad token
    assert inputs["cu_seq_lens_q"].tolist() == [0, 7, 26, 29, 60, 65]
    assert inputs["max_length_q"] == 31
    packed_loss = model(**inputs).loss

    model.config._attn_implementation = "sdpa"
    loss_sum, count = _per_example_loss_sum(model, [s for row in rows for s in row])
    torch.testing.assert_close(packed_loss, loss_sum / count, rtol=1e-5, atol=1e-5)


def test_without_packing_sequences_are_still_flattened_without_padding():
    _, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    rows = [[s] for s in random_sequences([4, 9, 2], 200)]
    inputs = batching.Collator(tokenizer, packing=False, flatten=True)(rows, torch.device("cpu"))
    assert inputs["input_ids"].shape == (1, 15)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]]
    assert "attention_mask" not in inputs


def test_reference_attention_keeps_sequences_apart():
    """Changing one sequence's keys and values leaves every other sequence's output unchanged."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 4, 8) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[5:9], v2[5:9] = torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    before = attention.reference_varlen_attention(q, k, v, cu, None)
    after = attention.reference_varlen_attention(q, k2, v2, cu, None)
    torch.testing.assert_close(before[:5], after[:5])
    torch.testing.assert_close(before[9:], after[9:])
    assert not torch.allclose(before[5:9], after[5:9])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_varlen_kernel_matches_reference_with_grouped_query_heads():
    torch.manual_seed(0)
    lengths = [300, 1, 77, 1024, 129]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    tokens, q_heads, kv_heads, dim = sum(lengths), 32, 8, 128

    def leaves():
        return [
            torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for heads in (q_heads, kv_heads, kv_heads)
        ]

    q, k, v = leaves()
    out, _ = attention.packed_attention_forward(
        None, q, k, v, None, scaling=dim**-0.5,
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
    )
    grad = torch.randn_like(out)
    out.backward(grad)

    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention.reference_varlen_attention(
        *(t[0].transpose(0, 1) for t in (rq, rk, rv)), cu.cpu(), dim**-0.5
    ).unsqueeze(0)
    ref.backward(grad.double())

    def relative_error(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert relative_error(out, ref) < 1e-2
    for mine, reference in ((q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad)):
        assert relative_error(mine, reference) < 1e-2

