"""Load a JSONL dataset and turn it into packed, label-masked training rows.

Stages, each a function:
  read_examples   JSONL -> validated records (torch-free; bad lines name file and line)
  tokenize        record -> (input_ids, labels) with labels -100 outside the answer
  split           deterministic train/validation split by seed
  pack_rows       sequences -> rows of at most maxSeqLength tokens
  collate         rows -> tensors (in batching.py, which needs torch)

Formats, detected from the first good record when format is auto:
  chat               {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}
  prompt-completion  {"prompt": str, "completion": str}
  text               {"text": str}
Loss is taken on assistant turns (chat), on the completion (prompt-completion) and on all of
the text (text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import ownership
from finetune_trainer.config import DatasetConfig
from finetune_trainer.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value transformers' loss ignores
CHAT_ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_file(config: DatasetConfig) -> Path:
    """The dataset file, symlinks resolved; refused if they lead outside its volume (volumeRoot)."""
    return ownership.confined(config.path, config.volume_root, "dataset.path")


def dataset_digest(config: DatasetConfig) -> str:
    """SHA-256 of the dataset (the job's own when it names one: read_examples checked it)."""
    return config.sha256 or sha256_of_file(dataset_file(config))


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "text" in record:
        return "text"
    return None


def _check_record(record: Any, fmt: str) -> str | None:
    """Why this record is malformed for the format, or None when it is fine."""
    if not isinstance(record, dict):
        return "a line must hold a JSON object"
    if fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                return f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}"
            if not isinstance(message.get("content"), str):
                return f"messages[{i}].content must be a string"
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            return "a chat example needs at least one non-empty assistant message to learn from"
    elif fmt == "prompt-completion":
        if not isinstance(record.get("prompt"), str):
            return '"prompt" must be a string'
        if not isinstance(record.get("completion"), str) or not record["completion"]:
            return '"completion" must be a non-empty string'
    elif fmt == "text":
        if not isinstance(record.get("text"), str) or not record["text"]:
            return '"text" must be a non-empty string'
    return None


def read_examples(config: DatasetConfig) -> tuple[list[dict[str, Any]], str, int]:
    """Read and validate every line. Returns (records, format, number of skipped lines)."""
    path = dataset_file(config)
    if not path.is_file():
        raise DataError(f"dataset.path: {path} does not exist or is not a file")
    if config.sha256 is not None:
        actual = sha256_of_file(path)
        if actual != config.sha256:
            raise DataError(
                f"dataset.sha256: {path} has sha256 {actual}, the job expects {config.sha256}"
            )

    fmt = None if config.format == "auto" else config.format
    records: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not examples
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            else:
                if fmt is None and isinstance(record, dict):
                    fmt = detect_format(record)
                if fmt is None:
                    problem = 'no known format: expected "messages", "prompt"+"completion" or "text"'
                else:
                    problem = _check_record(record, fmt)
            if problem is None:
                records.append(record)
            elif config.skip_bad_lines:
                skipped += 1
            else:
                raise DataError(
                    f"{path}:{line_number}: {problem} (set dataset.skipBadLines to skip bad lines)"
                )
    if skipped:
        log.warning("skipped %d malformed line(s) in %s", skipped, path)
    if not records:
        detail = f" ({skipped} malformed line(s) skipped)" if skipped else ""
        raise DataError(f"dataset.path: {path} holds no usable examples{detail}")
    return records, fmt, skipped


def _label_spans(input_ids: list[int], spans: list[tuple[int, int]], offsets) -> list[int]:
    """Labels equal to input_ids for tokens that start inside a character span, else -100."""
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels


def _render_chat(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The chat-templated text and the character spans of assistant turns in it.

    Each assistant span is what the template adds between the conversation up to that turn
    (with the generation prompt) and the conversation including it, so it covers the answer
    and its end-of-turn token, and works with any template that renders prefixes stably.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if full.startswith(through) and through.startswith(prefix):
            spans.append((len(prefix), len(through)))
        else:  # a template that rewrites earlier turns: fall back to the answer text itself
            start = full.find(message["content"], len(prefix) if full.startswith(prefix) else 0)
            if start >= 0:
                spans.append((start, start + len(message["content"])))
    return full, spans


def tokenize(record: dict[str, Any], fmt: str, tokenizer, max_length: int) -> Sequence:
    """One record -> one sequence, truncated to max_length tokens."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if fmt == "chat":
        text, spans = _render_chat(record["messages"], tokenizer)
    elif fmt == "prompt-completion":
        prompt = bos + record["prompt"]
        text = prompt + record["completion"] + eos
        spans = [(len(prompt), len(text))]
    else:
        text = bos + record["text"] + eos
        spans = [(len(bos), len(text))]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_length]
    labels = _label_spans(input_ids, spans, encoded["offset_mapping"][:max_length])
    # A sequence's first token is never a target: in a packed row it would be "predicted"
    # from the previous sequence's last token.
    labels[0] = IGNORE_INDEX
    return Sequence(input_ids, labels)


def tokenize_all(records, fmt: str, tokenizer, max_length: int) -> list[Sequence]:
    sequences = [tokenize(record, fmt, tokenizer, max_length) for record in records]
    usable = [s for s in sequences if s.trained_tokens > 0]
    if len(usable) < len(sequences):
        log.warning(
            "%d example(s) have no answer tokens left after truncation to maxSeqLength=%d; dropped",
            len(sequences) - len(usable),
            max_length,
        )
    if not usable:
        raise DataError(
            f"dataset: no example has answer tokens within training.maxSeqLength={max_length}"
        )
    return usable


def split(items: list, validation_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic (train, validation) split: the same seed gives the same split."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_validation = round(len(items) * validation_fraction)
    if validation_fraction > 0 and len(items) >= 2:
        n_validation = max(1, n_validation)
    n_validation = min(n_validation, len(items) - 1)
    validation = [items[i] for i in sorted(order[:n_validation])]
    train = [items[i] for i in sorted(order[n_validation:])]
    return train, validation


def pack_rows(sequences: list[Sequence], max_length: int, packing: bool, seed: int) -> list[list[Sequence]]:
    """Group sequences into rows of at most max_length tokens.

    Without packing every row holds one sequence. With packing, sequences are taken in a
    seeded random order and each goes into the current row while it fits (next-fit), which
    keeps rows nearly full without sorting the dataset by length.
    """
    if not packing:
        return [[s] for s in sequences]
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    rows: list[list[Sequence]] = []
    current: list[Sequence] = []
    used = 0
    for i in order:
        sequence = sequences[i]
        if current and used + len(sequence.input_ids) > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(sequence)
        used += len(sequence.input_ids)
    if current:
        rows.append(current)
    return rows
