"""Which rows each process trains on at each step, and how rows become tensors.

The data order is a pure function of (seed, step): epoch e shuffles the rows with seed+e,
and optimizer step s takes the next globalBatchSize rows. Resuming from a checkpoint at step
s therefore sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from finetune_trainer.config import (
    AUTO_EPOCHS,
    AUTO_GLOBAL_BATCH_MAX,
    AUTO_MAX_EPOCHS,
    AUTO_MAX_STEPS,
    AUTO_MIN_STEPS,
    AUTO_STEPS_PER_EPOCH,
    TrainingConfig,
)
from finetune_trainer.data import IGNORE_INDEX, Sequence
from finetune_trainer.errors import ConfigError, DataError

Row = list[Sequence]


def auto_global_batch(num_rows: int, micro_batch_size: int, world_size: int) -> int:
    """globalBatchSize "auto": a whole number of micro-batches per process, at most
    AUTO_GLOBAL_BATCH_MAX rows, aiming at AUTO_STEPS_PER_EPOCH steps per epoch, and never less
    than one micro-batch per process (so a dataset that fills one step always trains; fewer
    rows than that is StepPlan.validate's error)."""
    per_step = micro_batch_size * world_size
    target = min(AUTO_GLOBAL_BATCH_MAX, num_rows // AUTO_STEPS_PER_EPOCH)
    return max(per_step, target // per_step * per_step)


def auto_epochs(steps_per_epoch: int) -> int:
    """epochs "auto": AUTO_EPOCHS passes, unless that is fewer than AUTO_MIN_STEPS steps (a small
    dataset: as many passes as reach them, at most AUTO_MAX_EPOCHS) or more than AUTO_MAX_STEPS
    (a large one: as many whole passes as fit, at least one)."""
    if steps_per_epoch <= 0:
        return AUTO_EPOCHS  # no step fits at all: StepPlan.validate says why
    if AUTO_EPOCHS * steps_per_epoch < AUTO_MIN_STEPS:
        return min(AUTO_MAX_EPOCHS, -(-AUTO_MIN_STEPS // steps_per_epoch))
    if AUTO_EPOCHS * steps_per_epoch > AUTO_MAX_STEPS:
        return max(1, AUTO_MAX_STEPS // steps_per_epoch)
    return AUTO_EPOCHS


@dataclass(frozen=True)
class StepPlan:
    num_rows: int
    micro_batch_size: int
    global_batch_size: int
    world_size: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        # Incomplete final batches are dropped, so every step has the same size.
        return self.num_rows // self.global_batch_size

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def validate(self) -> None:
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.globalBatchSize: {self.global_batch_size} is not a multiple of "
                f"microBatchSize {self.micro_batch_size} x {self.world_size} process(es)"
            )
        if self.steps_per_epoch == 0:
            raise DataError(
                f"dataset: only {self.num_rows} training row(s), fewer than "
                f"training.globalBatchSize={self.global_batch_size}; add data or lower the batch size"
            )

    @classmethod
    def for_rows(cls, training: TrainingConfig, num_rows: int, world_size: int) -> StepPlan:
        """The plan for num_rows packed training rows on world_size processes, with the "auto"
        settings chosen: the batch size from the rows, then the epochs from the steps an epoch
        of that batch size takes. Not validated (validate says what cannot work)."""
        global_batch = training.global_batch_size
        if global_batch == "auto":
            global_batch = auto_global_batch(num_rows, training.micro_batch_size, world_size)
        epochs = training.epochs
        if epochs == "auto":
            epochs = auto_epochs(num_rows // global_batch)
        return cls(num_rows=num_rows, micro_batch_size=training.micro_batch_size, global_batch_size=global_batch,
                   world_size=world_size, epochs=epochs, max_steps=training.max_steps, seed=training.seed)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_rows(self, step: int) -> list[int]:
        """Row indices of one optimizer step, over all processes (what micro_batches splits)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = list(range(self.num_rows))
        random.Random(self.seed + epoch).shuffle(order)
        return order[position * self.global_batch_size : (position + 1) * self.global_batch_size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of this process's micro-batches for one optimizer step."""
        step_rows = self.step_rows(step)
        batches = []
        for micro in range(self.accumulation_steps):
            start = (micro * self.world_size + rank) * self.micro_batch_size
            batches.append(step_rows[start : start + self.micro_batch_size])
        return batches


class Collator:
    """Rows -> model inputs.

    flatten=True (a padding-free attention, see attention.py): every sequence of the
    micro-batch is concatenated into one row of shape [1, tokens], with position_ids
    restarting at 0 for each sequence and the boundaries passed as cu_seq_lens (transformers'
    DataCollatorWithFlattening). The varlen kernel runs each sequence on its own: no pad
    token is computed and no token attends across sequences. This holds with and without
    packing; packing only decides how many sequences a row (and so a micro-batch) holds.

    flatten=False, packing (SDPA/eager, e.g. CPU): rows stay rows, [micro, longest row], each
    holding several sequences with position_ids restarting at 0 for each; the row's tail
    padding is one more "sequence" with label -100. From the restarting position_ids
    transformers builds a block-diagonal causal mask, so sequences never attend to each other.

    flatten=False, no packing: one sequence per row, right-padded, with an attention mask.
    """

    MODEL_INPUTS = (
        "input_ids", "labels", "position_ids", "attention_mask",
        "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    )

    def __init__(self, tokenizer, packing: bool, flatten: bool):
        self.packing = packing
        self.flatten = flatten
        self.pad_token_id = tokenizer.pad_token_id
        if flatten:
            self._collate = DataCollatorWithFlattening(
                return_position_ids=True,
                return_flash_attn_kwargs=True,
                separator_id=IGNORE_INDEX,
                return_tensors="pt",
            )
        elif not packing:
            self._collate = DataCollatorForSeq2Seq(
                tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
            )

    def __call__(self, rows: list[Row], device: torch.device) -> dict[str, torch.Tensor]:
        if self.packing and not self.flatten:
            batch = self._packed_rows(rows)
        else:
            features = [{"input_ids": s.input_ids, "labels": s.labels} for row in rows for s in row]
            batch = self._collate(features)
        inputs = {
            key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
            if key in self.MODEL_INPUTS
        }
        # With a KV cache present transformers ignores packed position_ids when building the
        # attention mask, so sequences would attend to each other. Training never needs the cache.
        inputs["use_cache"] = False
        return inputs

    def _packed_rows(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        width = max(sum(len(s.input_ids) for s in row) for row in rows)
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            ids = [t for s in row for t in s.input_ids]
            padding = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * padding)
            labels.append([t for s in row for t in s.labels] + [IGNORE_INDEX] * padding)
            position_ids.append([i for s in row for i in range(len(s.input_ids))] + list(range(padding)))
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(position_ids),
        }


def count_tokens(rows: list[Row]) -> int:
    return sum(len(s.input_ids) for row in rows for s in row)


def count_targets(rows: list[Row]) -> int:
    """Tokens the model's loss averages over for these rows. The causal LM loss shifts the labels
    by one (token t predicts label t+1), so a sequence's first label is never a target; it is
    always -100 (data.tokenize, and the collators' separators), so counting labels counts targets."""
    return sum(s.trained_tokens for row in rows for s in row)
