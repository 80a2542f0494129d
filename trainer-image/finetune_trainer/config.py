"""The contract between the operator and the trainer: the config file, torch-free.

Each training section (dataset options, method, training, distributed, checkpointing) is
defined here once, with its defaults, bounds, user-facing descriptions and cross-field rules.
The trainer validates its config file with these models; the operator's API
(`finetune_operator.api`) composes the same models into the FineTuneJob and adds only the
Kubernetes parts, and the CRDs and `docs/api.md` are generated from that. A new training
setting is therefore written once, here, and a FineTuneJob can set it.

A cross-field rule is a `Rule`: its CEL expression goes into the CRD (so `kubectl apply`
rejects a bad spec) and its Python twin, written next to it, checks a config file the trainer
reads directly. A bad value becomes a ConfigError naming the field, e.g.
``method.lora.r: must be >= 1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from finetune_trainer.errors import ConfigError

# Built-in random-init models (implemented in finetune_trainer.presets). Listed here so the
# config can be validated without torch.
PRESET_NAMES = ("tiny-llama", "llama-1b", "llama-3b", "llama-8b")

SHA256_HEX = r"^[a-f0-9]{64}$"
HF_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once: CEL for the API server, Python for the trainer.

    `holds` is None for transition rules (`oldSelf`), which only the API server can check."""

    cel: str
    message: str
    field: str | None = None  # the field the error points at, relative to the model (".offload")
    holds: Callable[[Any], bool] | None = None
    reason: str | None = None  # the API server's error reason, when not FieldValueInvalid

    def to_cel(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message}
        if self.field:
            entry["fieldPath"] = self.field
        if self.reason:
            entry["reason"] = self.reason
        return entry


def _rules_into_schema(schema: dict[str, Any], cls: type) -> None:
    rules = [rule.to_cel() for rule in getattr(cls, "RULES", ())]
    if rules:
        schema["x-kubernetes-validations"] = rules


class ContractModel(BaseModel):
    """Base of every contract type: camelCase on the wire, unknown fields rejected, frozen."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              json_schema_extra=_rules_into_schema)
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in type(self).RULES:
            if rule.holds is not None and not rule.holds(self):
                where = (rule.field or "").lstrip(".")
                named = not where or rule.message.startswith(where)
                raise ValueError(rule.message if named else f"{where}: {rule.message}")
        return self

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def immutable(what: str) -> dict[str, Any]:
    """A transition rule that rejects any change once the object exists (API server only)."""
    return {"x-kubernetes-validations": [
        Rule("self == oldSelf", f"{what} is immutable once the job is created; create a new FineTuneJob instead").to_cel()
    ]}


# --- the training sections: shared by the config file and the FineTuneJob ---------------------


def int_or_keyword_message(low: int, high: int, keywords: list[str]) -> str:
    """The error for an int-or-keyword value, as the parser and the CRD's CEL rule say it."""
    return f"must be an integer from {low} to {high}, or {' or '.join(keywords)}"


# The largest explicit global batch, and what auto aims at (finetune_trainer.batching.auto_global_batch).
MAX_GLOBAL_BATCH = 1_048_576
AUTO_GLOBAL_BATCH_MAX = 32
AUTO_STEPS_PER_EPOCH = 16
# epochs "auto" (finetune_trainer.batching.auto_epochs): AUTO_EPOCHS passes, more for a small
# dataset so the run has at least AUTO_MIN_STEPS optimizer steps (at most AUTO_MAX_EPOCHS
# passes), fewer for a large one so it has at most AUTO_MAX_STEPS (never less than one pass).
MAX_EPOCHS = 1000
AUTO_EPOCHS = 3
AUTO_MIN_STEPS = AUTO_EPOCHS * AUTO_STEPS_PER_EPOCH
AUTO_MAX_EPOCHS = 25
AUTO_MAX_STEPS = 2000


class BaseModelOptions(ContractModel):
    revision: str | None = Field(
        default=None, max_length=256, description="Hub revision (branch, tag or commit) for hf:// sources."
    )


class DatasetOptions(ContractModel):
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_HEX,
        description="Expected SHA-256 of the data file (64 lowercase hex digits); the trainer fails if it differs.",
    )
    format: Literal["auto", "chat", "prompt-completion", "text"] = Field(
        default="auto",
        description="Record format: chat (`messages`), prompt-completion (`prompt`/`completion`), text "
        "(`text`), or auto to detect it from the first record.",
    )
    validation_split: float = Field(
        default=0.05, ge=0.0, le=0.5, description="Fraction of records held out to compute the eval loss."
    )
    skip_bad_lines: bool = Field(
        default=False,
        description="Skip malformed lines (and report how many) instead of failing on the first one.",
    )


class LoraConfig(ContractModel):
    """Adapter hyperparameters for lora, qlora and dora."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(default=32, gt=0, le=4096, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter input. Off by default: it costs step time and memory (bench/README.md).",
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt (for example q_proj, v_proj), or all-linear for every linear "
        "layer except the output head.",
    )


class MethodConfig(ContractModel):
    """How the model is fine-tuned."""

    type: Literal["lora", "qlora", "dora", "full"] = Field(
        default="lora",
        description="lora: low-rank adapters; qlora: LoRA on a 4-bit NF4 base (GPU only); dora: "
        "weight-decomposed LoRA; full: every weight is trained.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings; ignored for full fine-tuning.")

    @property
    def uses_adapter(self) -> bool:
        return self.type != "full"


class TrainingConfig(ContractModel):
    """Optimisation hyperparameters."""

    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | Literal["auto"] = Field(
        default="auto",
        description="Passes over the training split, or auto: chosen from the steps an epoch takes, "
        f"{AUTO_EPOCHS} passes, more (up to {AUTO_MAX_EPOCHS}) so that a small dataset trains at least "
        f"{AUTO_MIN_STEPS} steps, fewer (at least 1) so that a large one trains at most {AUTO_MAX_STEPS} "
        "(the choice is in status.progress.epochs and the Model's spec.runPlan.epochs).",
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps, whatever the epochs."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="How the learning rate moves after warm-up: constant, linear decay to 0, or cosine decay to 0."
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=10_000_000, description="Optimizer steps over which the learning rate rises linearly from 0 to its peak."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0.0, le=1_000_000, description="Clip the global gradient norm to this value; 0 disables clipping."
    )
    micro_batch_size: int = Field(default=4, ge=1, le=4096, description="Sequences per process per forward pass.")
    global_batch_size: Annotated[int, Field(ge=1, le=MAX_GLOBAL_BATCH)] | Literal["auto"] = Field(
        default="auto",
        description="Sequences per optimizer step across all processes: a multiple of microBatchSize times the number "
        f"of processes (nodes x acceleratorsPerNode), or auto: chosen from the packed training rows, at most "
        f"{AUTO_GLOBAL_BATCH_MAX} and at least one micro-batch per process, aiming at {AUTO_STEPS_PER_EPOCH} steps "
        "per epoch (the choice is in status.progress.globalBatchSize and the Model's spec.runPlan.globalBatchSize).",
    )
    # The largest value each int-or-auto field takes (the lowest is 1): one message for pydantic's
    # two failed variants, the same one the CRD's rule gives.
    _AUTO_FIELD_MAX: ClassVar[dict[str, int]] = {"epochs": MAX_EPOCHS, "global_batch_size": MAX_GLOBAL_BATCH}

    @field_validator(*_AUTO_FIELD_MAX, mode="wrap")
    @classmethod
    def _int_or_auto(cls, value: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(int_or_keyword_message(1, cls._AUTO_FIELD_MAX[info.field_name], ["auto"])) from None

    max_seq_length: int = Field(default=2048, ge=16, le=1_048_576, description="Longest sequence in tokens.")
    packing: bool = Field(default=True, description="Pack several records into each sequence (padding-free).")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory. true: every layer; false: "
        "none; unset: only as many layers as the GPU's memory needs, measured when training starts (none "
        "on CPU; every layer with ZeRO-3 or offload).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for initialisation, data order and split.")
    compile: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer. Unset: on for GPU jobs with lora, qlora or full at "
        "zeroStage 0-2 (where the benchmark shows it pays), off otherwise; false opts out.",
    )


class DistributedConfig(ContractModel):
    """Parallelism: DeepSpeed ZeRO across processes and nodes."""

    RULES = (
        Rule("self.offload != 'parameters' || self.zeroStage == 3",
             "parameters offload needs zeroStage 3", ".offload",
             lambda d: d.offload != "parameters" or d.zero_stage == 3),
        Rule("self.offload != 'optimizer' || self.zeroStage >= 1",
             "optimizer offload needs zeroStage 1, 2 or 3", ".offload",
             lambda d: d.offload != "optimizer" or d.zero_stage >= 1),
    )

    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage (0 to 3).")
    offload: Literal["none", "optimizer", "parameters"] = Field(
        default="none",
        description="Offload to CPU memory: optimizer state (ZeRO 1-3) or also parameters (ZeRO 3 only).",
    )


class CheckpointingOptions(ContractModel):
    """Periodic checkpoints on the output volume, used to resume after any restart."""

    every_steps: int = Field(default=200, ge=1, le=10_000_000, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(default=2, ge=1, le=100, description="How many recent checkpoints to keep.")


# --- the trainer-only sections: where things are inside the pod --------------------------------


class BaseModelConfig(BaseModelOptions):
    source: str = Field(
        description="preset://NAME, hf://org/name, or an absolute directory holding a model"
    )
    token_file: str | None = Field(None, description="file holding the hub token; never logged")
    cache_dir: str | None = Field(None, description="hub cache directory for hf://; default HF_HOME")
    volume_root: str | None = Field(
        None, description="the directory the files must stay inside once symlinks are resolved (the volume's "
        "mount); a file that resolves outside it is refused. null: no confinement"
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, source: str) -> str:
        import re

        if source.startswith("preset://"):
            name = source.removeprefix("preset://")
            if name not in PRESET_NAMES:
                raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
        elif source.startswith("hf://"):
            if not re.match(HF_REPO_ID, source.removeprefix("hf://")):
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


class DatasetConfig(DatasetOptions):
    path: str = Field(description="local JSONL file, one example per line")
    volume_root: str | None = Field(
        None, description="the directory the files must stay inside once symlinks are resolved (the volume's "
        "mount); a file that resolves outside it is refused. null: no confinement"
    )


class OutputConfig(ContractModel):
    dir: str = Field(description="all outputs go here; result.json is written last")


class CheckpointingConfig(CheckpointingOptions):
    dir: str | None = Field(None, description="default <output.dir>/checkpoints")
    key_file: str | None = Field(
        None, description="file holding the job's checkpoint key (the operator mounts it from the job's "
        "<job>-checkpoint-key Secret): checkpoints are signed with it and resumed only if their signature and "
        "files verify. null: unsigned checkpoints, resumed unverified (local runs)"
    )
    key_sha256: str | None = Field(
        None, pattern=SHA256_HEX, description="SHA-256 of the key in keyFile, as the operator generated it; a key "
        "file with another digest (a replaced Secret) is refused"
    )


class ReportingConfig(ContractModel):
    progress_file: str | None = Field(
        None, description="JSON-lines progress stream; null = stdout lines with PROGRESS_PREFIX"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint; 0 = disabled")
    metrics_host: str = Field(
        "0.0.0.0",
        description="address the metrics endpoint binds; $(VAR) is replaced by the environment variable VAR, "
        "e.g. $(POD_IP) set from the pod's status.podIP, so pods that share a host never share an address",
    )
    termination_message_path: str | None = None
    progress_url: str | None = Field(
        None, description="operator endpoint that receives the latest progress (POST JSON); null = off"
    )
    progress_token_file: str | None = Field(
        None, description="bearer token for progressUrl (a projected service-account token); re-read on every post"
    )


# --- what the operator tells the trainer about the Model it will publish ----------------------


class ModelBaseRef(BaseModelOptions):
    """The base model the weights apply to."""

    source: str = Field(max_length=1024, description="Source of the base model, as in the FineTuneJob.")


class DatasetRef(ContractModel):
    """The data the model was trained on."""

    source: str = Field(max_length=1024, description="Source of the dataset, as in the FineTuneJob.")
    sha256: str | None = Field(default=None, pattern=SHA256_HEX, description="SHA-256 of the data, when known.")


class SourceJobRef(ContractModel):
    """The FineTuneJob that produced this Model."""

    name: str = Field(max_length=253, description="Name of the FineTuneJob.")
    uid: str = Field(max_length=64, description="UID of the FineTuneJob.")


class PublishConfig(ContractModel):
    """The Model the outputs are published as, in the user's terms (URIs, not pod paths). The
    operator sets it; with it the trainer writes model.yaml, the same manifest the operator
    publishes (both through finetune_trainer.model_manifest.render_model)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Model.")
    namespace: str | None = Field(default=None, description="Namespace of the Model.")
    uri: str = Field(max_length=1024, description="Where the files are, as the job's output destination says.")
    base_model: ModelBaseRef
    dataset: DatasetRef
    source_job: SourceJobRef


class JobConfig(ContractModel):
    job_name: str = Field(min_length=1)
    job_uid: str | None = Field(
        None, max_length=64, description="the FineTuneJob's UID; with jobName, the owner of output.dir and of its "
        "checkpoints: a directory another job owns is refused, and only this job's own checkpoints are resumed"
    )
    base_model: BaseModelConfig
    dataset: DatasetConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: OutputConfig
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)
    publish: PublishConfig | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointing.dir or Path(self.output.dir) / "checkpoints")


def options_of(section: BaseModel, options: type[ContractModel]) -> dict[str, Any]:
    """The fields of `section` that the contract type `options` defines, by Python name: how a
    FineTuneJob section becomes a config section without naming its fields again."""
    return {name: getattr(section, name) for name in options.model_fields}


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
        "string_pattern_mismatch": lambda: f"must match {ctx.get('pattern')}",
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
