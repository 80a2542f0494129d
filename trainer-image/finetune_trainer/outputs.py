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

from finetune_trainer.config import JobConfig
from finetune_trainer.data import sha256_of_file
from finetune_trainer.model_manifest import render_model
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, RESULT_FILE, TERMINATION_MESSAGE_LIMIT
from finetune_trainer.result import ResultMetrics, TrainerResult, World, termination_message
from finetune_trainer.run_plan import RunPlan



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


def save_weights(model: torch.nn.Module, tokenizer, full: bool, staging: Path, is_main: bool) -> None:
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
    tokenizer.save_pretrained(staging)


def publish_staged(staging: Path, output_dir: Path) -> list[str]:
    """Move staged files into output_dir (same filesystem: each move is a rename)."""
    names = []
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            relative = path.relative_to(staging)
            target = output_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            names.append(str(relative))
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
