import hashlib
import json

import pytest

from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import IGNORE_INDEX, pack_rows, read_examples, split, tokenize, tokenize_all
from finetune_trainer.errors import DataError
from trainer_helpers import arithmetic_chat, write_jsonl

import torch
from finetune_trainer import presets  # noqa: E402
from finetune_trainer.batching import Collator, StepPlan  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return presets.build_tokenizer()


def labelled_text(sequence, tokenizer):
    return tokenizer.decode([t for t in sequence.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt-completion"),
        ({"text": "hello"}, "text"),
    ],
)
def test_format_is_detected(tmp_path, record, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    records, detected, skipped = read_examples(DatasetConfig(path=str(path)))
    assert (len(records), detected, skipped) == (2, fmt, 0)


def test_malformed_line_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": "a"}), "", "{not json", json.dumps({"text": "b"})]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_examples(DatasetConfig(path=str(path)))


def test_wrong_shape_for_detected_format(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "robot", "content": "q"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=r":2: messages\[0\].role must be one of"):
        read_examples(DatasetConfig(path=str(path)))


def test_skip_bad_lines_counts_them(tmp_path):
    lines = [{"text": "a"}, "garbage", {"prompt": "p"}, {"text": ""}, {"text": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    records, fmt, skipped = read_examples(DatasetConfig(path=str(path), skip_bad_lines=True))
    assert (len(records), fmt, skipped) == (2, "text", 3)


def test_empty_and_all_bad_datasets_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no usable examples"):
        read_examples(DatasetConfig(path=str(empty)))
    bad = write_jsonl(tmp_path / "bad.jsonl", ["x", "y"])
    with pytest.raises(DataError, match=r"no usable examples \(2 malformed line\(s\) skipped\)"):
        read_examples(DatasetConfig(path=str(bad), skip_bad_lines=True))
    with pytest.raises(DataError, match="does not exist"):
        read_examples(DatasetConfig(path=str(tmp_path / "missing.jsonl")))


def test_sha256_must_match(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_examples(DatasetConfig(path=str(path), sha256=digest))[0]
    with pytest.raises(DataError, match="dataset.sha256: .* has sha256 " + digest):
        read_examples(DatasetConfig(path=str(path), sha256="0" * 64))


def test_chat_labels_cover_only_assistant_turns(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]}
    sequence = tokenize(record, "chat", tokenizer, 1024)
    assert len(sequence.labels) == len(sequence.input_ids)
    assert labelled_text(sequence, tokenizer) == "Paris.<|eot_id|>Rome.<|eot_id|>"
    assert tokenizer.decode(sequence.input_ids).startswith("<|begin_of_text|><|start_header_id|>system")


def test_prompt_completion_and_text_labels(tokenizer):
    sequence = tokenize({"prompt": "2+2=", "completion": "4"}, "prompt-completion", tokenizer, 64)
    assert labelled_text(sequence, tokenizer) == "4<|end_of_text|>"
    sequence = tokenize({"text": "héllo"}, "text", tokenizer, 64)
    # Every token but the first is a target; multi-byte characters survive byte-level BPE.
    assert labelled_text(sequence, tokenizer) == "héllo<|end_of_text|>"
    assert sequence.labels[0] == IGNORE_INDEX


def test_truncation_drops_examples_without_answer_tokens(tokenizer):
    long_prompt = {"prompt": "x" * 200, "completion": "y"}
    with pytest.raises(DataError, match="no example has answer tokens within training.maxSeqLength=32"):
        tokenize_all([long_prompt], "prompt-completion", tokenizer, 32)
    kept = tokenize_all([long_prompt, {"prompt": "a", "completion": "b"}], "prompt-completion", tokenizer, 32)
    assert len(kept) == 1 and all(len(s.input_ids) <= 32 for s in kept)


def test_split_is_deterministic_by_seed():
    items = list(range(100))
    train, validation = split(items, 0.1, seed=3)
    assert (len(train), len(validation)) == (90, 10)
    assert sorted(train + validation) == items
    assert split(items, 0.1, seed=3) == (train, validation)
    assert split(items, 0.1, seed=4)[1] != validation
    assert len(split(items[:5], 0.01, seed=0)[1]) == 1  # a requested split is never empty
    assert split(items, 0.0, seed=0)[1] == []


def test_packing_respects_max_length(tokenizer):
    sequences = tokenize_all(arithmetic_chat(40), "chat", tokenizer, 128)
    rows = pack_rows(sequences, 256, packing=True, seed=0)
    assert sum(len(r) for r in rows) == len(sequences)
    assert all(sum(len(s.input_ids) for s in row) <= 256 for row in rows)
    assert len(rows) < len(sequences) / 2
    assert len(pack_rows(sequences, 256, packing=False, seed=0)) == len(sequences)


@pytest.mark.parametrize("flatten", [True, False], ids=["flattened", "rows"])
def test_packed_batch_gives_the_same_results_as_separate_sequences(tokenizer, flatten):
    """Packing must be exact: no attention across sequence boundaries, no cross-boundary targets."""
    from finetune_trainer.adapters import prepare_for_training
    from finetune_trainer.config import MethodConfig

    model, _ = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model = prepare_for_training(model, MethodConfig(type="full"), enable_checkpointing=False)
    model.eval()
    cpu = torch.device("cpu")
    sequences = tokenize_all(arithmetic_chat(5, seed=3), "chat", tokenizer, 128)
    rows = [sequences[:3], sequences[3:]]  # unequal rows: the second one gets tail padding
    packed = Collator(tokenizer, packing=True, flatten=flatten)(rows, cpu)
    assert packed["input_ids"].shape[0] == (1 if flatten else 2) and "attention_mask" not in packed

    with torch.no_grad():
        packed_out = model(**packed)
        alone = [model(**Collator(tokenizer, packing=False, flatten=False)([[s]], cpu)) for s in sequences]

    # Each sequence's logits inside the packed batch equal its logits when run alone.
    starts = []
    for r, row in enumerate(rows):
        offset = 0 if not flatten or r == 0 else sum(len(s.input_ids) for s in rows[0])
        for sequence in row:
            starts.append((0 if flatten else r, offset, len(sequence.input_ids)))
            offset += len(sequence.input_ids)
    for (row_index, offset, n), out in zip(starts, alone):
        torch.testing.assert_close(packed_out.logits[row_index, offset : offset + n], out.logits[0], atol=1e-4, rtol=1e-4)
    # The packed loss is the token-weighted mean of the separate losses.
    weights = [s.trained_tokens for s in sequences]
    expected = sum(w * out.loss for w, out in zip(weights, alone)) / sum(weights)
    torch.testing.assert_close(packed_out.loss, expected, atol=1e-5, rtol=1e-5)


def test_step_plan_splits_each_step_across_processes():
    single = StepPlan(num_rows=20, micro_batch_size=1, global_batch_size=4, world_size=1, epochs=2, max_steps=None, seed=1)
    double = StepPlan(num_rows=20, micro_batch_size=1, global_batch_size=4, world_size=2, epochs=2, max_steps=None, seed=1)
    assert (single.total_steps, single.accumulation_steps, double.accumulation_steps) == (10, 4, 2)
    for step in range(single.total_steps):
        one = sorted(i for batch in single.micro_batches(step, 0) for i in batch)
        two = sorted(i for rank in (0, 1) for batch in double.micro_batches(step, rank) for i in batch)
        assert one == two
    epoch0 = [i for s in range(5) for b in single.micro_batches(s, 0) for i in b]
    epoch1 = [i for s in range(5, 10) for b in single.micro_batches(s, 0) for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
