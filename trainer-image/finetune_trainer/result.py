"""The trainer's result: what result.json and the termination message say (torch-free).

When every output is written, the trainer writes result.json last and, in a pod, the same JSON
(compact) to the termination message, which Kubernetes copies into the container status (at most
TERMINATION_MESSAGE_LIMIT bytes). The operator publishes a Model only from a message that parses
into `TrainerResult`; exit 0 without one is a failure.

  {"files": {"adapter_model.safetensors": {"sha256": "...", "size": 123}, ...},
   "metrics": {"trainLoss": ..., "evalLoss": ..., "initialEvalLoss": ..., "steps": ..., "tokens": ...},
   "world": {"worldSize": 2, "nodes": 1, "processesPerNode": 2},
   "runPlan": {...}}

"files" lists every output file except result.json itself (checkpoints are not outputs). A
message that would be too long keeps only the weights file; "filesOmitted" says how many entries
were dropped and "omittedBytes" their size, so the Model's size stays right. result.json always
lists them all.

"world" is the process group the trainer actually joined, as torch.distributed saw it after
init, never copied from its config: the operator compares it with what the FineTuneJob asked for
(a launcher that ignores torchrun's environment trains one world-size-1 copy per pod, and each
"succeeds").
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator

from finetune_trainer.config import SHA256_HEX, ContractModel
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, TERMINATION_MESSAGE_LIMIT
from finetune_trainer.run_plan import RunPlan

# The file whose digest identifies the weights, in order of preference: a PEFT adapter, a
# single-file full model, or the index of a sharded one.
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


class InvalidResult(ValueError):
    """The termination message is missing or is not a valid result."""


class FileDigest(ContractModel):
    """Digest of one output file."""

    sha256: str = Field(pattern=SHA256_HEX, description="SHA-256 of the file.")
    size: int = Field(ge=0, description="Size in bytes.")


class ResultMetrics(ContractModel):
    # An operator older than the trainer still reads what it knows of a result.
    model_config = ConfigDict(extra="ignore")

    train_loss: float = Field(description="Mean loss per target token over the last optimizer steps.")
    eval_loss: float | None = Field(default=None, description="Loss per target token on the validation split.")
    initial_eval_loss: float | None = Field(default=None, description="The same, before the first step.")
    steps: int = Field(ge=1, description="Optimizer steps run.")
    tokens: int = Field(ge=0, description="Training tokens processed.")
    skipped_lines: int = Field(default=0, ge=0, description="Malformed dataset lines skipped.")

    @field_validator("train_loss", "eval_loss", "initial_eval_loss")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class World(ContractModel):
    """The process group the trainer joined, as torch.distributed reported it after init."""

    model_config = ConfigDict(extra="ignore")

    world_size: int = Field(ge=1, description="Trainer processes in the process group (torch.distributed's world size).")
    nodes: int = Field(ge=1, description="Distinct nodes among them (node ranks gathered from every process).")
    processes_per_node: int = Field(ge=1, description="Processes on each node (the most on any one node).")

    def describe(self) -> str:
        return f"world size {self.world_size} on {self.nodes} node(s) x {self.processes_per_node}"


class TrainerResult(ContractModel):
    model_config = ConfigDict(extra="ignore")

    files: dict[str, FileDigest] = Field(min_length=1)
    metrics: ResultMetrics
    # Required: a result that does not say which world trained it cannot be checked, so it is invalid.
    world: World
    run_plan: RunPlan | None = None
    files_omitted: int = Field(default=0, ge=0)
    omitted_bytes: int = Field(default=0, ge=0)

    @field_validator("files")
    @classmethod
    def _lists_weights(cls, files: dict[str, FileDigest]) -> dict[str, FileDigest]:
        if weights_file(files) is None:
            raise ValueError(f"lists no weights file ({', '.join(WEIGHT_FILES)})")
        return files

    @property
    def weights_file(self) -> str:
        return weights_file(self.files)

    @property
    def format(self) -> str:
        return "peft" if self.weights_file == "adapter_model.safetensors" else "full"

    def model_files(self) -> dict[str, FileDigest]:
        """The files a Model lists: every output but the manifest, which cannot describe itself."""
        return {name: digest for name, digest in sorted(self.files.items()) if name != MODEL_MANIFEST_FILE}

    @property
    def model_size(self) -> int:
        return sum(f.size for f in self.model_files().values()) + self.omitted_bytes


def weights_file(files: dict[str, Any]) -> str | None:
    return next((name for name in WEIGHT_FILES if name in files), None)


def termination_message(result: TrainerResult) -> str:
    """The result as one compact JSON line that fits the termination message."""
    message = json.dumps(result.to_wire(), separators=(",", ":"))
    if len(message.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return message
    kept = {result.weights_file: result.files[result.weights_file]}
    dropped = result.model_files().keys() - kept.keys()
    short = result.model_copy(update={
        "files": kept,
        "files_omitted": len(result.files) - len(kept),
        "omitted_bytes": sum(result.files[name].size for name in dropped),
    })
    return json.dumps(short.to_wire(), separators=(",", ":"))


def parse_result(message: str | None) -> TrainerResult:
    if not message or not message.strip():
        raise InvalidResult("the trainer exited 0 but reported no result (empty termination message)")
    try:
        raw = json.loads(message)
    except json.JSONDecodeError as exc:
        raise InvalidResult(f"the trainer's termination message is not JSON: {exc.msg} at char {exc.pos}") from None
    try:
        return TrainerResult.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        raise InvalidResult(f"the trainer's result is invalid: {where}: {first['msg'].removeprefix('Value error, ')}") from None
