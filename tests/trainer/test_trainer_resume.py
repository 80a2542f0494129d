"""A run stopped mid-way (SIGTERM, or SIGKILL) resumes from its checkpoint and ends where an
uninterrupted run ends: same step count, same losses for the remaining steps, same adapter."""

import json
import os
import signal

import pytest

from trainer_helpers import (
    arithmetic_chat, assert_ok, make_config, read_progress, run_trainer, start_trainer, wait_for_progress,
    write_config, write_jsonl,
)

import torch
import deepspeed  # noqa: F401  (a broken install fails, never skips)
from safetensors.torch import load_file  # noqa: E402

TOTAL_STEPS = 24
SETTINGS = {
    "training.maxSteps": TOTAL_STEPS,
    "training.epochs": 1,
    "checkpointing.everySteps": 4,
    "checkpointing.keep": 2,
    "method.lora.dropout": 0.1,  # dropout masks must continue identically after a resume
}


def config_for(tmp_path, dataset, name):
    config = make_config(tmp_path, dataset, **SETTINGS, **{
        "output.dir": str(tmp_path / name), "reporting.progressFile": str(tmp_path / f"{name}.jsonl"),
    })
    return write_config(tmp_path, config, f"{name}.json")


def losses(progress):
    return {r["step"]: r["loss"] for r in progress if r["event"] == "progress"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_chat(48))
    assert_ok(run_trainer(config_for(tmp_path, dataset, "reference")))
    return tmp_path, dataset, losses(read_progress(tmp_path / "reference.jsonl")), load_file(
        tmp_path / "reference" / "adapter_model.safetensors"
    )


def assert_same_finish(tmp_path, name, reference, resumed_at):
    _, _, reference_losses, reference_adapter = reference
    progress = read_progress(tmp_path / f"{name}.jsonl")
    started = [r for r in progress if r["event"] == "started"]
    assert [s["step"] for s in started] == [0, resumed_at] and started[1]["resumed"] is True
    # The loss curve continues: the steps after the checkpoint are the steps the
    # uninterrupted run took, with the same losses (same data order, optimizer, dropout).
    after = [r for r in progress[progress.index(started[1]):] if r["event"] == "progress"]
    assert [r["step"] for r in after] == list(range(resumed_at + 1, TOTAL_STEPS + 1))
    for record in after:
        assert record["loss"] == pytest.approx(reference_losses[record["step"]], rel=1e-4, abs=1e-5)
    result = json.loads((tmp_path / name / "result.json").read_text())
    assert result["metrics"]["steps"] == TOTAL_STEPS
    adapter = load_file(tmp_path / name / "adapter_model.safetensors")
    for key, tensor in reference_adapter.items():
        torch.testing.assert_close(adapter[key], tensor, atol=1e-5, rtol=1e-4, msg=key)


def test_sigterm_checkpoints_exits_143_and_resumes(reference):
    tmp_path, dataset, _, _ = reference
    config = config_for(tmp_path, dataset, "sigterm")
    process = start_trainer(config)
    wait_for_progress(tmp_path / "sigterm.jsonl", process, min_step=5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert "stopped by SIGTERM at step" in output.splitlines()[-1]
    assert not (tmp_path / "sigterm" / "result.json").exists()

    progress = read_progress(tmp_path / "sigterm.jsonl")
    stopped_at = [r for r in progress if r["event"] == "preempted"][0]["step"]
    assert 5 <= stopped_at < TOTAL_STEPS
    checkpoints = sorted(p.name for p in (tmp_path / "sigterm" / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{stopped_at:08d}" and len(checkpoints) <= 2  # keep: 2

    assert_ok(run_trainer(config))
    assert_same_finish(tmp_path, "sigterm", reference, resumed_at=stopped_at)


def test_sigkill_resumes_from_latest_complete_checkpoint(reference):
    tmp_path, dataset, _, _ = reference
    config = config_for(tmp_path, dataset, "sigkill")
    process = start_trainer(config)
    wait_for_progress(tmp_path / "sigkill.jsonl", process, min_step=10)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    root = tmp_path / "sigkill" / "checkpoints"
    complete = sorted(p.name for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    assert complete, "no complete checkpoint before the kill"
    latest = int(complete[-1].removeprefix("step-"))
    assert latest % 4 == 0 and latest >= 8

    assert_ok(run_trainer(config))
    assert not list(root.glob(".tmp-step-*"))
    assert_same_finish(tmp_path, "sigkill", reference, resumed_at=latest)


def test_changed_config_refuses_foreign_checkpoints(reference):
    tmp_path, dataset, _, _ = reference
    config = make_config(tmp_path, dataset, **SETTINGS, **{
        "output.dir": str(tmp_path / "foreign"), "training.learningRate": 1e-3,
        "checkpointing.dir": str(tmp_path / "sigterm" / "checkpoints"),
    })
    result = run_trainer(write_config(tmp_path, config, "foreign.json"))
    assert result.returncode == 2
    assert "holds checkpoints of a different job config" in result.stderr


def test_sigterm_under_torchrun_with_zero3(tmp_path, chat_dataset):
    """torchrun forwards SIGTERM to every worker; they agree on one step, save one checkpoint
    together and stop. torchrun itself exits 1, so the termination message carries 143."""
    from trainer_helpers import TORCHRUN, free_port, trainer_env
    import subprocess

    config = make_config(tmp_path, chat_dataset, **{
        "training.maxSteps": 30, "training.microBatchSize": 1, "distributed.zeroStage": 3,
        "checkpointing.everySteps": 100, "reporting.terminationMessagePath": str(tmp_path / "termination-log"),
    })
    path = write_config(tmp_path, config)

    def torchrun():
        return [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                str(free_port()), "--module", "finetune_trainer.cli", "--config", str(path)]

    process = subprocess.Popen(torchrun(), env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_progress(tmp_path / "progress.jsonl", process, min_step=3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert output.count("stopped by SIGTERM at step") == 2, output[-3000:]  # both workers
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["exitCode"] == 143
    stopped_at = [r for r in read_progress(tmp_path / "progress.jsonl") if r["event"] == "preempted"][0]["step"]
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == [f"step-{stopped_at:08d}"]

    result = subprocess.run(torchrun(), env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert_ok(result)
    started = [r["step"] for r in read_progress(tmp_path / "progress.jsonl") if r["event"] == "started"]
    assert started == [0, stopped_at]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]["steps"] == 30
