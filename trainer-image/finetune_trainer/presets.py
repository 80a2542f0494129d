"""Built-in random-init models: preset://tiny-llama, llama-1b, llama-3b, llama-8b.

No hub is reachable from tests and demos, so presets are built here: a Llama config, a
seeded random init (the same preset always has the same weights on the same device type,
so an adapter trained on it loads back onto a freshly built copy), and a byte-level
tokenizer made with the `tokenizers` package, carrying Llama-3 special tokens and chat
template. The big presets keep Llama-3's 128,256-row embedding (the logits dominate memory,
which is what benchmarks must see); the tokenizer only uses the first few hundred ids.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from finetune_trainer.config import PRESET_NAMES

PRESET_INIT_SEED = 1234  # pinned: part of a preset's identity, independent of the job's seed

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD]

# Llama-3's chat format. The assistant turn ends with <|eot_id|>, which is part of the answer
# the model learns (so it learns to stop).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_LLAMA3_COMMON = dict(
    vocab_size=128_256,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    attention_bias=False,
    mlp_bias=False,
)

PRESET_SHAPES: dict[str, dict] = {
    # A few hundred thousand parameters: trains in seconds on two CPU cores.
    "tiny-llama": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B
    "llama-1b": dict(
        _LLAMA3_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # Llama-3.2-3B
    "llama-3b": dict(
        _LLAMA3_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # Llama-3.1-8B
    "llama-8b": dict(
        _LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
}
assert set(PRESET_SHAPES) == set(PRESET_NAMES)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (no merges), plus Llama-3 special tokens.

    Byte-level means any UTF-8 text round-trips, and no training corpus is needed, so the
    tokenizer is the same everywhere.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=PRESET_SHAPES["tiny-llama"]["max_position_embeddings"],
    )


def preset_config(name: str, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    shape = dict(PRESET_SHAPES[name])
    # tiny-llama's embedding is sized to the tokenizer; the big ones keep Llama-3's vocab.
    shape.setdefault("vocab_size", len(tokenizer))
    return LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)],
        pad_token_id=tokenizer.pad_token_id,
    )


def build_preset(name: str, dtype: torch.dtype, device: torch.device) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The preset's model (seeded random init, built directly on `device`) and tokenizer."""
    if name not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {name!r}")
    tokenizer = build_tokenizer()
    config = preset_config(name, tokenizer)
    # fork_rng: the pinned init seed must not disturb the job's own random stream.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(PRESET_INIT_SEED)
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
