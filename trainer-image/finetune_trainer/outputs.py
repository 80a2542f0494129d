"""Final outputs: weights, tokenizer, model.yaml, and result.json last.

result.json is the trainer's proof of success. It is removed at start, written only after
every other output is complete, and written atomically (temp file, fsync, rename), so a
crash never leaves something that looks finished. Its shape, and the termination message that
repeats it, are defined in finetune_trainer.result; model.yaml is rendered by
finetune_trainer.model_manifest, the same function the operator publishes the Model with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from finetune_trainer.config import BaseModelConfig, JobConfig
from finetune_trainer.data import sha256_of_file
from finetune_trainer.model_manifest import render_model
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, RESULT_FILE, TERMINATION_MESSAGE_LIMIT
from finetune_trainer.result import ResultMetrics, TrainerResult, World, termination_message
from finetune_trainer.run_plan import RunPlan

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for it



def gather_trainable_state_dict(model: torch.nn.Module, full: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """Full tensors of the parameters to save, on CPU, on rank 0 (empty elsewhere).

    Under ZeRO-3 each process holds only a shard of every parameter; saving model.state_dict()
    there writes empty tensors. GatheredParameters reassembles one parameter at a time (all
    processes must take part), so rank 0 never holds more than the saved weights plus one
    parameter. For other stages it is a no-op.
    """
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        if not (full or parameter.requires_grad):
            continue
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if is_main:
                state[name] = parameter.detach().to("cpu", copy=True)
    return state


def save_weights(model: torch.nn.Module, tokenizer, full: bool, staging: Path, is_main: bool,
                 base_model: BaseModelConfig | None = None) -> None:
    state = gather_trainable_state_dict(model, full, is_main)
    if not is_main:
        return
    staging.mkdir(parents=True)
    # For a PEFT model save_pretrained keeps only the adapter keys of `state` and writes
    # adapter_model.safetensors + adapter_config.json; for full fine-tuning it writes the whole
    # model (model.safetensors + config.json + generation_config.json).
    if full:
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
    else:
        # Embeddings are never trained here (all-linear leaves them out), so PEFT need not
        # look up the base model's config to decide whether to save them.
        model.save_pretrained(staging, state_dict=state, safe_serialization=True, save_embedding_layers=False)
        if base_model is not None:
            name_the_base_model(staging / ADAPTER_CONFIG, base_model)
    tokenizer.save_pretrained(staging)


def name_the_base_model(adapter_config: Path, base_model: BaseModelConfig) -> None:
    """PEFT records where this process loaded the base model from: a hub cache or volume path
    inside the pod, which no server can resolve. An hf:// base is recorded as its hub id and
    revision, so PEFT, vLLM or KServe find it anywhere; a preset or a directory has no name
    that travels, so none is recorded. The source as the job wrote it stays in model.yaml and
    the Model (baseModel)."""
    config = json.loads(adapter_config.read_text())
    if base_model.source.startswith("hf://"):
        config["base_model_name_or_path"] = base_model.source.removeprefix("hf://")
        config["revision"] = base_model.revision
    else:
        config["base_model_name_or_path"] = None
        config["revision"] = None
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Published files are world-readable (directories traversable): a serving pod with another UID
# reads them from the shared volume. safetensors writes its files 0600; the tokenizer's are
# 0644 by the umask. Who reaches the volume at all is the claim's and the directory's business.
PUBLISHED_FILE_MODE = 0o644
PUBLISHED_DIR_MODE = 0o755


def publish_staged(staging: Path, output_dir: Path) -> list[str]:
    """Move staged files into output_dir (same filesystem: each move is a rename)."""
    names = []
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            relative = path.relative_to(staging)
            target = output_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path, PUBLISHED_FILE_MODE)
            os.replace(path, target)
            names.append(str(relative))
            for parent in target.relative_to(output_dir).parents:
                if parent != Path("."):
                    os.chmod(output_dir / parent, PUBLISHED_DIR_MODE)
    shutil.rmtree(staging, ignore_errors=True)
    return names


def describe_files(output_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {"sha256": sha256_of_file(output_dir / name), "size": (output_dir / name).stat().st_size}
        for name in sorted(names)
    }


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_results(config: JobConfig, output_dir: Path, names: list[str], metrics: dict[str, Any], world: World,
                  run_plan: RunPlan | None = None) -> dict[str, Any]:
    """Write model.yaml (when the operator gave a publish section) and then result.json."""
    if config.publish is not None:
        import yaml

        # model.yaml cannot list its own digest, so the manifest is rendered from the files
        # written so far, which are exactly the files a Model lists (TrainerResult.model_files).
        provisional = _result(output_dir, names, metrics, world, run_plan)
        manifest = render_model(config.publish, config.method, config.training, provisional)
        _write_atomically(output_dir / MODEL_MANIFEST_FILE, yaml.safe_dump(manifest, sort_keys=False))
        names = [*names, MODEL_MANIFEST_FILE]
    result = _result(output_dir, names, metrics, world, run_plan)
    _write_atomically(output_dir / RESULT_FILE, json.dumps(result.to_wire(), indent=2))
    if config.reporting.termination_message_path:
        write_termination_message(config.reporting.termination_message_path, termination_message(result))
    return result.to_wire()


def _result(output_dir: Path, names: list[str], metrics: dict[str, Any], world: World,
            run_plan: RunPlan | None) -> TrainerResult:
    return TrainerResult(files=describe_files(output_dir, names), metrics=ResultMetrics.model_validate(metrics),
                         world=world, run_plan=run_plan)


def write_termination_message(path: str, message: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(message[:TERMINATION_MESSAGE_LIMIT])
    except OSError:
        pass  # the message is a convenience; result.json is the record
