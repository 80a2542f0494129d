"""Exclusive outputs and confined inputs (finetune_trainer.ownership).

A trainer writes into output.dir only once it has claimed it with an owner file naming its job;
a directory another job owns (or one holding files nobody claimed) is refused with exit code 3
and left exactly as it was: its result.json, adapter and checkpoints survive. A job resumes
only its own checkpoints. Input files (the dataset, the base model's files) whose symlinks
lead outside their volume are refused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from finetune_trainer import ownership
from finetune_trainer.config import BaseModelConfig, DatasetConfig, parse_config
from finetune_trainer.data import read_examples
from finetune_trainer.errors import ConfigError, DestinationInUse
from finetune_trainer.protocol import EXIT_DESTINATION_IN_USE, OWNER_FILE
from trainer_helpers import arithmetic_chat, assert_ok, make_config, run_trainer, write_config, write_jsonl


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its digest: what "left as it was" means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- the owner file ------------------------------------------------------------------------------

def test_an_empty_directory_is_claimed_and_its_owner_carries_on(tmp_path):
    out = tmp_path / "out"
    ownership.claim(out, "job", "uid-1")
    assert json.loads((out / OWNER_FILE).read_text()) == {"jobName": "job", "jobUid": "uid-1"}
    (out / "checkpoints").mkdir()
    ownership.claim(out, "job", "uid-1")  # a retry of the same job: its own files are fine
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNER_FILE, "checkpoints"])


@pytest.mark.parametrize("name, uid", [("job", "uid-2"), ("other", "uid-1"), ("job", None)])
def test_another_jobs_directory_is_refused_untouched(tmp_path, name, uid):
    """Another UID is another job, even under the same name (a job deleted and re-created)."""
    out = tmp_path / "out"
    ownership.claim(out, "job", "uid-1")
    (out / "result.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(DestinationInUse, match=r"output.destination is in use: .* belongs to job 'job' \(uid uid-1\)"):
        ownership.claim(out, name, uid)
    assert snapshot(out) == before


def test_files_nobody_claimed_are_not_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"weights of something else")
    (out / "lost+found").mkdir()  # a fresh filesystem's root: not anybody's output
    with pytest.raises(DestinationInUse, match=r"already holds files \(adapter_model.safetensors\)"):
        ownership.claim(out, "job", "uid-1")
    assert not (out / OWNER_FILE).exists()


def test_a_symlinked_or_broken_owner_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere.json").write_text(json.dumps({"jobName": "job", "jobUid": "uid-1"}))
    (out / OWNER_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(DestinationInUse, match="cannot be read"):
        ownership.claim(out, "job", "uid-1")
    (out / OWNER_FILE).unlink()
    (out / OWNER_FILE).write_text("")
    with pytest.raises(DestinationInUse, match="not a valid owner file"):
        ownership.claim(out, "job", "uid-1")


def _claim_in_process(out: str, uid: str, results) -> None:
    try:
        ownership.claim(Path(out), "job", uid)
        results.put(uid)
    except DestinationInUse:
        results.put(None)


def test_of_trainers_racing_for_one_directory_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    processes = [ctx.Process(target=_claim_in_process, args=(str(out), f"uid-{i}", results)) for i in range(8)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(30)
    winners = [w for w in (results.get(timeout=5) for _ in processes) if w]
    assert len(winners) == 1
    assert json.loads((out / OWNER_FILE).read_text())["jobUid"] == winners[0]
    assert [p.name for p in out.iterdir()] == [OWNER_FILE]  # no temporary file left behind


def test_an_owner_file_that_appeared_meanwhile_is_never_overwritten(tmp_path):
    """Two trainers both found no owner file; the one that creates it second must lose."""
    out = tmp_path / "out"
    out.mkdir()
    (out / OWNER_FILE).write_text(json.dumps({"jobName": "job", "jobUid": "uid-first"}))
    assert ownership._create_owner_file(out, {"jobName": "job", "jobUid": "uid-second"})["jobUid"] == "uid-first"
    assert json.loads((out / OWNER_FILE).read_text())["jobUid"] == "uid-first"
    assert [p.name for p in out.iterdir()] == [OWNER_FILE]


# --- confined inputs -----------------------------------------------------------------------------

@pytest.fixture
def volume(tmp_path):
    """A claim's directory, and a secret outside it (a mounted Secret, a file of the node)."""
    root = tmp_path / "claim"
    root.mkdir()
    secret = tmp_path / "secret-token"
    secret.write_text('{"text": "hf_secret_value"}\n')
    return root, secret


def test_a_dataset_symlinked_out_of_its_volume_is_refused(volume):
    root, secret = volume
    (root / "train.jsonl").symlink_to(secret)
    with pytest.raises(ConfigError, match=r"dataset.path: .* outside its volume"):
        read_examples(DatasetConfig(path=str(root / "train.jsonl"), volume_root=str(root)))
    (root / "up").symlink_to("..")  # a relative link out is the same
    with pytest.raises(ConfigError, match="outside its volume"):
        read_examples(DatasetConfig(path=str(root / "up" / "secret-token"), volume_root=str(root)))
    # Without a root (a trainer run by hand) the file is read as it is.
    assert read_examples(DatasetConfig(path=str(root / "train.jsonl")))[0] == [{"text": "hf_secret_value"}]


def test_symlinks_inside_the_volume_are_fine(volume):
    root, _ = volume
    write_jsonl(root / "v2.jsonl", arithmetic_chat(3))
    (root / "sets").mkdir()
    (root / "sets" / "latest.jsonl").symlink_to("../v2.jsonl")
    records, fmt, _ = read_examples(DatasetConfig(path=str(root / "sets" / "latest.jsonl"), volume_root=str(root)))
    assert len(records) == 3 and fmt == "chat"


def _tiny_model_dir(path: Path) -> Path:
    import torch

    from finetune_trainer import presets

    model, tokenizer = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import torch  # noqa: F401  (a broken install fails, never skips)
    return _tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def test_a_base_model_with_a_file_linked_out_of_its_volume_is_refused(volume, saved_model):
    """The loaders would read the link and save_pretrained would copy it into the output."""
    import shutil

    from finetune_trainer.model_loading import resolve_model_dir

    root, secret = volume
    model = root / "base"
    shutil.copytree(saved_model, model)
    config = BaseModelConfig(source=str(model), volume_root=str(root))
    assert resolve_model_dir(config) == model.resolve()
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(ConfigError, match=r"baseModel.source: .*tokenizer_config.json resolves to .* outside its volume"):
        resolve_model_dir(config)


def test_a_base_model_reached_through_a_linked_directory_is_checked_there_too(volume, saved_model):
    import shutil

    from finetune_trainer.model_loading import resolve_model_dir

    root, secret = volume
    shutil.copytree(saved_model, root / "real")
    (root / "real" / "extra").symlink_to(secret)
    (root / "real" / "loop").symlink_to(root / "real")  # a cycle must not hang the walk
    (root / "base").symlink_to(root / "real")
    with pytest.raises(ConfigError, match="extra resolves to"):
        resolve_model_dir(BaseModelConfig(source=str(root / "base"), volume_root=str(root)))
    (root / "real" / "extra").unlink()
    assert resolve_model_dir(BaseModelConfig(source=str(root / "base"), volume_root=str(root))) == (root / "real").resolve()
    # A linked directory inside the model, whose target (inside the volume) links out.
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "evil.json").symlink_to(secret)
    (root / "real" / "sub").symlink_to(root / "elsewhere")
    with pytest.raises(ConfigError, match="evil.json resolves to"):
        resolve_model_dir(BaseModelConfig(source=str(root / "base"), volume_root=str(root)))
    (root / "real" / "sub").unlink()
    (root / "linked").symlink_to(secret.parent)  # the model directory itself outside
    with pytest.raises(ConfigError, match="outside its volume"):
        resolve_model_dir(BaseModelConfig(source=str(root / "linked"), volume_root=str(root)))


# --- checkpoints are the job's own ---------------------------------------------------------------

def test_the_checkpoint_fingerprint_names_the_job_and_the_data():
    import torch  # noqa: F401  (a broken install fails, never skips)
    from finetune_trainer.checkpointing import config_fingerprint

    base = {"jobName": "j", "jobUid": "uid-1", "baseModel": {"source": "preset://tiny-llama"},
            "dataset": {"path": "/d.jsonl"}, "output": {"dir": "/o"}}
    fingerprint = config_fingerprint(parse_config(base), 1, "a" * 64)
    assert fingerprint == config_fingerprint(parse_config(base), 1, "a" * 64)
    assert fingerprint != config_fingerprint(parse_config({**base, "jobUid": "uid-2"}), 1, "a" * 64)  # re-created job
    assert fingerprint != config_fingerprint(parse_config({**base, "jobName": "k"}), 1, "a" * 64)
    assert fingerprint != config_fingerprint(parse_config(base), 1, "b" * 64)  # the same path, other data
    assert fingerprint != config_fingerprint(parse_config(base), 2, "a" * 64)


# --- the trainer, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Job `first` (uid-1) trained to the end into out/, with checkpoints left there."""
    import deepspeed  # noqa: F401  (a broken install fails, never skips)
    tmp_path = tmp_path_factory.mktemp("owned")
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_chat(24))
    config = make_config(tmp_path, dataset, jobName="first", jobUid="uid-1", **{
        "training.maxSteps": 3, "training.epochs": 1, "checkpointing.everySteps": 1})
    assert_ok(run_trainer(write_config(tmp_path, config, "first.json")))
    out = tmp_path / "out"
    assert (out / "result.json").is_file() and list((out / "checkpoints").glob("step-*"))
    return tmp_path, dataset, config


@pytest.mark.parametrize("name, uid", [("second", "uid-2"), ("first", "uid-recreated")])
def test_a_second_job_leaves_the_first_jobs_outputs_and_checkpoints_alone(finished, name, uid):
    """The issue's reproduction: a second job with the same destination deleted result.json,
    overwrote the adapter and resumed the first job's checkpoints. Now it stops before any of it."""
    tmp_path, dataset, _ = finished
    out = tmp_path / "out"
    before = snapshot(out)
    termination = tmp_path / f"termination-{name}-{uid}"
    config = make_config(tmp_path, dataset, jobName=name, jobUid=uid, **{
        "training.maxSteps": 3, "training.epochs": 1, "reporting.terminationMessagePath": str(termination)})
    result = run_trainer(write_config(tmp_path, config, f"{name}-{uid}.json"))
    assert result.returncode == EXIT_DESTINATION_IN_USE, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune-trainer: error: output.destination is in use: ") and "belongs to job 'first'" in last
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before  # result.json, adapter, model.yaml, checkpoints: all as they were
    assert json.loads(termination.read_text())["exitCode"] == EXIT_DESTINATION_IN_USE


def test_a_job_never_resumes_another_jobs_checkpoints(finished):
    """Even pointed straight at them (checkpointing.dir), with the owner file out of the way."""
    tmp_path, dataset, first = finished
    config = make_config(tmp_path, dataset, jobName="first", jobUid="uid-recreated", **{
        "training.maxSteps": 3, "training.epochs": 1, "output.dir": str(tmp_path / "fresh"),
        "checkpointing.dir": str(tmp_path / "out" / "checkpoints")})
    result = run_trainer(write_config(tmp_path, config, "recreated.json"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "or of another job (a job resumes only its own checkpoints)" in result.stderr
    # The same job resumes them (what a retry does): same config, same UID.
    again = run_trainer(write_config(tmp_path, {**first, "checkpointing": {**first["checkpointing"], "everySteps": 1}},
                                     "first-again.json"))
    assert_ok(again)
    assert os.path.exists(tmp_path / "out" / "result.json")
