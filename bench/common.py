"""Shared pieces of the benchmark: synthetic data, FLOP accounting, case naming.

Torch-free except where noted, so the orchestrator (run.py) can import it cheaply.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

# Dense bf16 peak of the card, for MFU. H100 SXM and H200 share the same tensor cores
# (989.4 TFLOP/s dense bf16, datasheet). The measured matmul ceiling is reported beside it.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}

VARIABLE_MEAN_TOKENS = 500  # lognormal mix, mean about 500 tokens
VARIABLE_SIGMA = 0.8


@dataclass
class Case:
    model: str            # preset name: llama-1b | llama-3b | llama-8b
    method: str           # lora | qlora | dora | full
    data: str             # fixed | variable
    system: str           # ours | hf-baseline
    seq_len: int = 2048
    variant: str = "default"  # ours: "default" (trainer defaults) or tokens like mb2-nogc (parse_variant)
    gpus: int = 1         # ours only: processes (one per GPU) under torchrun, data parallel
    warmup: int = 3       # steps skipped (allocator warm-up, cuBLAS heuristics, torch.compile)
    measure: int = 8      # steps timed
    profile: bool = False  # profile 2 extra steps after the measured ones
    lora_r: int = 16
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.model, self.method, self.data, str(self.seq_len), self.system]
        if self.gpus > 1:
            parts.append(f"{self.gpus}gpu")
        if self.system == "ours":
            parts.append(self.variant)
        return "_".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))


def parse_variant(variant: str) -> dict:
    """'default' = the trainer's config defaults, untouched (micro-batch 4; gradient
    checkpointing, LoRA dropout, torch.compile and ZeRO stage as the trainer chooses).

    Otherwise '-'-joined tokens that override one setting each:
      mbN       micro-batch N
      gc, nogc  gradient checkpointing on every layer / on none (default: only as memory needs)
      drop05    LoRA dropout 0.05 (the trainer's default before it went to 0)
      nocompile torch.compile off
      sdpa      SDPA over padded packed rows instead of the padding-free varlen kernel (the
                trainer's attention before varlen; cuDNN SDPA off, as the trainer then set it)
      zN        ZeRO stage N
      offload   ZeRO's optimizer state and update on the CPU (distributed.offload: optimizer)
      liger     Liger's RMSNorm, RoPE and SwiGLU kernels too, patched in by the harness
      noflce    the loss through materialised logits (the trainer's default is Liger's fused
                linear + cross-entropy on GPUs; rows before that default say `flce` for it)
      capN      this process may allocate N GiB of the GPU (e.g. cap78: an 80 GB card's share
                on a larger one); the trainer's memory planner sees the cap
      foreach   torch AdamW's multi-pass foreach update instead of its fused kernel
      overflowcheck  DeepSpeed's bf16 gradient overflow check on (its default; the trainer
                turns it off and checks the loss and gradient norm itself)
      accN      N micro-batches per process per optimizer step (gradient accumulation; the
                globalBatchSize auto chooses 32 rows, acc8 at micro-batch 4 on one GPU, from 512 packed rows up)
    None means "leave the trainer's default".
    """
    out = {"micro_batch": 4, "gradient_checkpointing": None, "dropout": None, "compile": None,
           "sdpa": False, "zero_stage": None, "offload": False, "liger": False, "noflce": False,
           "foreach": False, "overflowcheck": False, "accumulation": 1, "memory_cap_gib": None}
    if variant == "default":
        return out
    for token in variant.split("-"):
        if token.startswith("mb"):
            out["micro_batch"] = int(token[2:])
        elif token in ("gc", "nogc"):
            out["gradient_checkpointing"] = token == "gc"
        elif token == "drop05":
            out["dropout"] = 0.05
        elif token == "nocompile":
            out["compile"] = False
        elif token == "sdpa":
            out["sdpa"] = True
        elif token.startswith("z") and token[1:].isdigit():
            out["zero_stage"] = int(token[1:])
        elif token == "liger":
            out["liger"] = True
        elif token in ("noflce", "foreach", "overflowcheck", "offload"):
            out[token] = True
        elif token.startswith("cap") and token[3:].isdigit():
            out["memory_cap_gib"] = int(token[3:])
        elif token.startswith("acc") and token[3:].isdigit():
            out["accumulation"] = int(token[3:])
        else:
            raise ValueError(f"unknown variant token {token!r} in {variant!r}")
    return out


def sequence_lengths(kind: str, count: int, seq_len: int, seed: int = 0) -> list[int]:
    """Token lengths (BOS and EOS included) of the synthetic examples."""
    if kind == "fixed":
        return [seq_len] * count
    rng = random.Random(seed)
    mu = math.log(VARIABLE_MEAN_TOKENS) - VARIABLE_SIGMA**2 / 2  # mean of lognormal = e^(mu+s^2/2)
    return [min(seq_len, max(16, int(rng.lognormvariate(mu, VARIABLE_SIGMA)))) for _ in range(count)]


def synthetic_texts(lengths: list[int], seed: int = 0) -> list[str]:
    """Random lowercase text: the presets' byte-level tokenizer makes one token per byte, so a
    text of n-2 letters is exactly n tokens with BOS and EOS."""
    rng = random.Random(seed + 1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=n - 2)) for n in lengths]


def model_shape(preset: str) -> dict:
    from finetune_trainer.presets import PRESET_SHAPES  # imports torch; call from the worker

    return PRESET_SHAPES[preset]


def flops_per_token(shape: dict, lora_r: int, method: str, attn_ctx: float) -> dict:
    """Training FLOPs per token.

    N: parameters that take part in matmuls (all decoder linears + the LM head; the embedding
    lookup is free). Attention: causal, forward+backward, 6*L*d*ctx per token, where ctx is the
    token-weighted sequence length sum(n^2)/sum(n) (packed sequences never attend to each other,
    so only each sequence's own length counts).
      6N:           (6N + attention), the usual full fine-tune count.
      method-aware: LoRA/QLoRA/DoRA freeze the base weights, so there is no weight-gradient GEMM:
                    4N + 6*N_lora + attention. Full fine-tune: same as 6N.
    Recompute from gradient checkpointing is not counted (MFU, not HFU).
    """
    d, ff, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    kv = kv_heads * (d // heads)
    vocab = shape.get("vocab_size", 128_256)
    per_layer = d * d * 2 + d * kv * 2 + d * ff * 3
    n = L * per_layer + vocab * d
    # LoRA on all 7 linears of each layer: r*(in+out) each.
    n_lora = L * lora_r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    attention = 6 * L * d * attn_ctx
    six_n = 6 * n + attention
    method_aware = six_n if method == "full" else 4 * n + 6 * n_lora + attention
    return {"N": n, "N_lora": n_lora, "flops6N": six_n, "flopsMethodAware": method_aware}
