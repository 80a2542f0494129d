"""The trainer's result, as reported through the container's termination message.

Contract: when the trainer has written every output and, last, `result.json`, it writes the same
JSON (compact) to /dev/termination-log and exits 0. Kubernetes copies that file into
`status.containerStatuses[].state.terminated.message` (at most 4096 bytes; a trainer with more
files than fit lists only the weights file and sets `filesOmitted`). The operator publishes a
Model only from a message that parses into `TrainerResult`; exit 0 without one is a failure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .api import SHA256_HEX

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


class InvalidResult(ValueError):
    """The termination message is missing or is not a valid result."""


class ReportedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=SHA256_HEX)
    size: int = Field(ge=0)


class ReportedMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    train_loss: float = Field(alias="trainLoss")
    eval_loss: float | None = Field(default=None, alias="evalLoss")
    initial_eval_loss: float | None = Field(default=None, alias="initialEvalLoss")
    steps: int = Field(ge=1)
    tokens: int = Field(ge=0)

    @field_validator("train_loss", "eval_loss", "initial_eval_loss")
    @classmethod
    def finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class TrainerResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    files: dict[str, ReportedFile] = Field(min_length=1)
    metrics: ReportedMetrics
    files_omitted: int = Field(default=0, ge=0, alias="filesOmitted")

    @property
    def weights_file(self) -> str:
        for name in WEIGHT_FILES:
            if name in self.files:
                return name
        shards = sorted(n for n in self.files if n.startswith("model-") and n.endswith(".safetensors"))
        return shards[0]

    @property
    def format(self) -> str:
        return "peft" if "adapter_model.safetensors" in self.files else "full"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())

    def files_wire(self) -> dict[str, Any]:
        return {name: f.model_dump() for name, f in sorted(self.files.items())}


def parse_result(message: str | None) -> TrainerResult:
    if not message or not message.strip():
        raise InvalidResult("the trainer exited 0 but reported no result (empty termination message)")
    try:
        raw = json.loads(message)
    except json.JSONDecodeError as exc:
        raise InvalidResult(f"the trainer's termination message is not JSON: {exc.msg} at char {exc.pos}") from None
    try:
        result = TrainerResult.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        raise InvalidResult(f"the trainer's result is invalid: {where}: {first['msg']}") from None
    has_weights = any(n in result.files for n in WEIGHT_FILES) or any(
        n.startswith("model-") and n.endswith(".safetensors") for n in result.files
    )
    if not has_weights:
        raise InvalidResult("the trainer's result lists no weights file (adapter_model.safetensors or model*.safetensors)")
    return result
