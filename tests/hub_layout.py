"""A model laid out exactly like huggingface_hub's cache (models--org--name/{refs,snapshots}),
for tests that read hf:// models without a hub."""

from __future__ import annotations

from pathlib import Path


def save_as_hub_cache(cache: Path, repo_id: str, commit: str) -> Path:
    """The tiny-llama preset as `repo_id` at `commit`, with refs/main pointing at it."""
    import torch

    from finetune_trainer import presets

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
