"""The trainer's config file: pydantic v2 models, camelCase keys, torch-free.

The operator imports this module (without torch installed) to render the file it mounts
into the trainer pod, so this is the single definition of the contract. Every field is
validated here, and a bad value becomes a ConfigError naming the field, e.g.
``method.lora.r: must be >= 1``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from finetune_trainer.errors import ConfigError

# Built-in random-init models (implemented in finetune_trainer.presets). Listed here so the
# config can be validated without torch.
PRESET_NAMES = ("tiny-llama", "llama-1b", "llama-3b", "llama-8b")

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class BaseModelConfig(_Model):
    source: str = Field(
        description="preset://NAME, hf://org/name, or an absolute directory holding a model"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); hf:// only")
    token_file: str | None = Field(None, description="file holding the hub token; never logged")
    cache_dir: str | None = Field(None, description="hub cache directory for hf://; default HF_HOME")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, source: str) -> str:
        if source.startswith("preset://"):
            name = source.removeprefix("preset://")
            if name not in PRESET_NAMES:
                raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
        elif source.startswith("hf://"):
            if not _HF_REPO_ID.match(source.removeprefix("hf://")):
                raise ValueError(f"{source!r} is not of the form hf://org/name")
        elif not source.startswith("/"):
            raise ValueError(
                f"{source!r} must be preset://NAME, hf://org/name or an absolute directory"
            )
        return source

    @model_validator(mode="after")
    def _revision_only_for_hub(self) -> BaseModelConfig:
        if self.revision is not None and not self.source.startswith("hf://"):
            raise ValueError("revision: only allowed with an hf:// source")
        return self

    @property
    def preset_name(self) -> str | None:
        return self.source.removeprefix("preset://") if self.source.startswith("preset://") else None

    @property
    def hub_repo_id(self) -> str | None:
        return self.source.removeprefix("hf://") if self.source.startswith("hf://") else None


class DatasetConfig(_Model):
    path: str = Field(description="local JSONL file, one example per line")
    sha256: str | None = Field(None, description="if given, the file must have this digest")
    format: Literal["auto", "chat", "prompt-completion", "text"] = "auto"
    validation_split: float = Field(0.05, ge=0.0, lt=1.0)
    skip_bad_lines: bool = Field(False, description="skip malformed lines and report how many")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower().removeprefix("sha256:")
            if not _SHA256.match(value):
                raise ValueError("must be 64 hex digits")
        return value


class LoraConfig(_Model):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="off by default: it costs step time and memory")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="module names (e.g. q_proj) or all-linear",
    )


class MethodConfig(_Model):
    type: Literal["lora", "qlora", "dora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def uses_adapter(self) -> bool:
        return self.type != "full"


class TrainingConfig(_Model):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    learning_rate: float = Field(2.0e-4, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="rows per forward pass per process")
    global_batch_size: int = Field(32, ge=1, description="rows per optimizer step, all processes")
    max_seq_length: int = Field(2048, ge=16)
    packing: bool = Field(True, description="pack several examples into each row, padding-free")
    gradient_checkpointing: bool | None = Field(
        None,
        description="true: every layer; false: none; null: only as many layers as the GPU's memory "
        "needs (measured at start-up, see activation_memory)",
    )
    seed: int = Field(42, ge=0)
    compile: bool | None = Field(
        None,
        description="torch.compile each decoder layer; null: on GPUs for lora, qlora and full with zeroStage "
        "0-2, otherwise off (see compiling.wanted)",
    )
    warmup_steps: int = Field(0, ge=0)
    # Optional additions to the contract.
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")

    @model_validator(mode="after")
    def _batch_sizes_divide(self) -> TrainingConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"globalBatchSize: {self.global_batch_size} is not a multiple of "
                f"microBatchSize {self.micro_batch_size}"
            )
        return self


class DistributedConfig(_Model):
    zero_stage: int = Field(2, ge=0, le=3)
    offload: Literal["none", "optimizer", "parameters"] = "none"

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistributedConfig:
        if self.offload == "parameters" and self.zero_stage != 3:
            raise ValueError("offload: parameters offload needs zeroStage 3")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload: optimizer offload needs zeroStage 1, 2 or 3")
        return self


class OutputConfig(_Model):
    dir: str = Field(description="all outputs go here; result.json is written last")


class CheckpointingConfig(_Model):
    every_steps: int = Field(200, ge=1)
    keep: int = Field(2, ge=1)
    dir: str | None = Field(None, description="default <output.dir>/checkpoints")


class ReportingConfig(_Model):
    progress_file: str | None = Field(
        None, description="JSON-lines progress stream; null = stdout lines with PROGRESS_PREFIX"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint; 0 = disabled")
    metrics_host: str = "0.0.0.0"
    termination_message_path: str | None = None
    progress_url: str | None = Field(
        None, description="operator endpoint that receives the latest progress (POST JSON); null = off"
    )
    progress_token_file: str | None = Field(
        None, description="bearer token for progressUrl (a projected service-account token); re-read on every post"
    )


class JobConfig(_Model):
    job_name: str = Field(min_length=1)
    base_model: BaseModelConfig
    dataset: DatasetConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: OutputConfig
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)
    model_manifest: dict[str, Any] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointing.dir or Path(self.output.dir) / "checkpoints")


def _describe(error: dict[str, Any]) -> str:
    """One readable phrase for a pydantic error (pydantic's own wording is long-winded)."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    phrases = {
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}",
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
        "missing": lambda: "required",
        "extra_forbidden": lambda: "unknown field",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}",
        "too_short": lambda: "must not be empty",
        "string_too_short": lambda: "must not be empty",
    }
    if kind in phrases:
        return phrases[kind]()
    message = error["msg"]
    return message.removeprefix("Value error, ")


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        phrase = _describe(error)
        # Model-level validators already name their field in the message ("offload: ...").
        field, _, rest = phrase.partition(": ")
        if location and rest and field.isidentifier():
            lines.append(f"{location}.{phrase}")
        elif location:
            lines.append(f"{location}: {phrase}")
        else:
            lines.append(phrase)
    return "; ".join(lines)


def parse_config(data: Any) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: must be a mapping of fields")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path) -> JobConfig:
    """Read a YAML or JSON config file (JSON is YAML, so one parser reads both)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML/JSON: {exc}".splitlines()[0]) from None
    return parse_config(data)


def dump_config(config: JobConfig) -> str:
    """The config as the operator should render it (camelCase JSON)."""
    return json.dumps(config.model_dump(by_alias=True, mode="json"), indent=2)
