"""Padding-free attention for packed micro-batches.

The collator flattens a micro-batch into one row of shape [1, tokens] and passes the
sequence boundaries (cu_seq_lens_q/k, max_length_q/k, the FlashAttention kwargs that
transformers forwards to every attention call). The attention below then runs each
sequence on its own: no pad token is computed and no masked-out block either, which is
where SDPA over padded rows with a block-diagonal mask lost its time (bench/README.md).

Which kernel, by what the node has:
  - flash_attention_2, when the flash-attn package is installed;
  - PyTorch's own FlashAttention varlen kernel (torch.nn.attention.varlen, torch >= 2.10),
    registered with transformers under PACKED_ATTENTION; this is what the trainer image
    uses, since it needs no extra package;
  - SDPA on CPU, where rows stay padded (see batching.Collator).

The same registered function has a reference path (one SDPA call per sequence) for tensors
not on CUDA, so tests on CPU check the flattened inputs end to end against per-example runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "finetune_varlen"
FLATTENING_ATTENTIONS = ("flash_attention_2", PACKED_ATTENTION)


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def register() -> None:
    """Make PACKED_ATTENTION a valid attn_implementation for transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


def choose(device: torch.device) -> str:
    """The fastest attention this node has (module docstring). Deciding only: a caller that
    loads a model with PACKED_ATTENTION registers it first (planning.choose_model does)."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        if _torch_varlen_attn() is not None:
            return PACKED_ATTENTION
    return "sdpa"


def flattens(attention: str) -> bool:
    """Whether micro-batches are flattened into one padding-free row for this attention."""
    return attention in FLATTENING_ATTENTIONS


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q/k/v are [1, heads, tokens, head_dim];
    returns [1, tokens, heads, head_dim]. Causal within each sequence, none across them."""
    if dropout:
        raise ValueError("packed attention does not implement attention dropout")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one flattened row, got a batch of {query.shape[0]}")
    if cu_seq_lens_q is None:
        # A single unpacked sequence (e.g. a generation call): it is its own boundary.
        tokens = query.shape[2]
        cu_seq_lens_q = cu_seq_lens_k = torch.tensor([0, tokens], dtype=torch.int32, device=query.device)
        max_length_q = max_length_k = tokens
    # [1, heads, tokens, dim] -> [tokens, heads, dim], the varlen layout.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if q.is_cuda:
        # FlashAttention takes bf16/fp16 only. QLoRA keeps norms in fp32 (PEFT's k-bit
        # preparation), so its queries arrive in fp32: compute in bf16, as its matmuls do.
        kernel_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = _torch_varlen_attn()(
            q.to(kernel_dtype), k.to(kernel_dtype), v.to(kernel_dtype),
            cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            scale=scaling, window_size=(-1, 0),  # (-1, 0): causal
        ).to(q.dtype)
    else:
        out = reference_varlen_attention(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal attention over each [start, end) of cu_seq_lens separately, in [tokens, heads, dim]."""
    bounds = cu_seq_lens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
        out = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=ks.shape[0] != qs.shape[0]
        )
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces, dim=0)
