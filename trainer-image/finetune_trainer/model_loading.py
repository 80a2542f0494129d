"""Load the base model and its tokenizer from preset://, hf:// or a local directory.

Precision: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy on most hosts).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune_trainer import ownership, presets
from finetune_trainer.config import BaseModelConfig, MethodConfig
from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

# Files a training run needs from a hub repo. Repos often also hold duplicate weights in
# other formats (e.g. Llama's original/*.pth), which are large and unused here.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def training_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_token(token_file: str | None) -> str | None:
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"baseModel.tokenFile: cannot read {token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"baseModel.tokenFile: {token_file} is empty")
    return token


def fetch_hub_snapshot(config: BaseModelConfig) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, look up in the cache) the hub snapshot.

    Uses huggingface_hub's own cache layout (models--org--name/snapshots/<commit>/), so a
    cache volume shared between jobs is reused, and the token never reaches a log line.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            repo_id=config.hub_repo_id,
            revision=config.revision,
            token=read_token(config.token_file),
            cache_dir=config.cache_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
        )
    except RepositoryNotFoundError:
        raise ConfigError(
            f"baseModel.source: {config.source} not found, or the token cannot read it"
        ) from None
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"baseModel.source: {config.source} (revision {config.revision or 'main'}) is not in "
            "the local cache and the hub cannot be reached"
        ) from None
    except HfHubHTTPError as exc:
        raise ConfigError(f"baseModel.source: fetching {config.source} failed: {exc}".splitlines()[0]) from None
    return Path(path)


def resolve_model_dir(config: BaseModelConfig) -> Path | None:
    """The local directory holding the model, or None for a preset (built in memory)."""
    if config.preset_name is not None:
        return None
    if config.hub_repo_id is not None:
        return fetch_hub_snapshot(config)
    # Every file the loaders may open there resolves inside the volume (no symlink out of it).
    ownership.confined_tree(config.source, config.volume_root, "baseModel.source")
    path = ownership.confined(config.source, config.volume_root, "baseModel.source")
    if not (path / "config.json").is_file():
        raise ConfigError(f"baseModel.source: {config.source} is not a directory holding a model (no config.json)")
    return path


def _quantization_config(method: MethodConfig):
    """NF4 with double quantization (QLoRA), storing the packed weights as bf16 so ZeRO-3 can
    shard them alongside the rest of the model."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def load_tokenizer(config: BaseModelConfig, model_dir: Path | None):
    if model_dir is None:
        return presets.build_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise ConfigError(
            f"baseModel.source: {config.source} has no fast tokenizer (tokenizer.json), which is "
            "needed to find answer tokens"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only pads non-packed rows; never a target
    return tokenizer


def load_model(config: BaseModelConfig, model_dir: Path | None, method: MethodConfig, device: torch.device,
               attention: str):
    """The base model with `attention` as its attn_implementation (the run plan's choice)."""
    dtype = training_dtype(device)
    if attention == "sdpa" and device.type == "cuda":
        # Only on a GPU without a varlen kernel (torch < 2.10, no flash-attn). Packed rows then
        # reach SDPA with a block-diagonal mask and a width that changes from step to step. On
        # Hopper PyTorch sends masked SDPA to cuDNN, which builds a new execution plan for each
        # new shape: seconds of host time with the GPU idle (bench/README.md, profile of
        # llama-8b on the variable-length mix). The memory-efficient kernel takes the same
        # masks without per-shape plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if config.preset_name is not None and method.type != "qlora":
        model, _ = presets.build_preset(config.preset_name, dtype, device)
        model.config._attn_implementation = attention
        return model

    kwargs = dict(dtype=dtype, attn_implementation=attention)
    if method.type != "qlora":
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)

    kwargs["quantization_config"] = _quantization_config(method)
    kwargs["device_map"] = {"": device}
    if model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # A preset: bitsandbytes quantizes while loading saved weights, so save it first.
    with tempfile.TemporaryDirectory(prefix=f"preset-{config.preset_name}-") as saved:
        materialize_preset(config.preset_name, device, Path(saved))
        return AutoModelForCausalLM.from_pretrained(saved, **kwargs)


def materialize_preset(name: str, device: torch.device, target: Path) -> None:
    """Save a preset's weights to a directory (for QLoRA, which quantizes while loading)."""
    model, tokenizer = presets.build_preset(name, torch.bfloat16, device)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
