"""Two processes under torchrun (gloo on CPU) with DeepSpeed ZeRO 2 and 3."""

import json
import subprocess
import sys

import pytest

from trainer_helpers import TORCHRUN, assert_ok, free_port, make_config, run_trainer, trainer_env, write_config

import torch
import deepspeed  # noqa: F401  (a broken install fails, never skips)
from safetensors.torch import load_file  # noqa: E402


def train(tmp_path, dataset, name, nproc, **overrides):
    settings = {
        "output.dir": str(tmp_path / name),
        "reporting.progressFile": str(tmp_path / f"{name}.jsonl"),
        # One row per micro-batch and no dropout: two processes then compute the same
        # gradients as one process accumulating over twice the micro-batches.
        "training.microBatchSize": 1,
        "training.globalBatchSize": 4,
        "training.maxSteps": 4,
        "training.packing": False,
        **overrides,
    }
    config = make_config(tmp_path, dataset, **settings)
    result = run_trainer(write_config(tmp_path, config, f"{name}.json"), nproc=nproc)
    assert_ok(result)
    out = tmp_path / name
    weights = "model.safetensors" if settings.get("method.type") == "full" else "adapter_model.safetensors"
    return json.loads((out / "result.json").read_text()), load_file(out / weights)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    from trainer_helpers import arithmetic_chat, write_jsonl

    tmp_path = tmp_path_factory.mktemp("single")
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_chat(48))
    return tmp_path, dataset, train(tmp_path, dataset, "single", 1, **{"distributed.zeroStage": 0})


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one_process(single_process, stage):
    tmp_path, dataset, (single_result, single_adapter) = single_process
    result, adapter = train(tmp_path, dataset, f"zero{stage}", 2, **{"distributed.zeroStage": stage})

    assert result["metrics"]["steps"] == single_result["metrics"]["steps"] == 4
    assert result["metrics"]["tokens"] == single_result["metrics"]["tokens"]
    assert set(adapter) == set(single_adapter)
    for name, tensor in adapter.items():
        # Gathered, full-size tensors (ZeRO-3 would otherwise save empty shards)...
        assert tensor.shape == single_adapter[name].shape and tensor.numel() > 0, name
        # ...equal to what one process trained from the same data, up to float reordering.
        torch.testing.assert_close(tensor, single_adapter[name], atol=2e-5, rtol=1e-3, msg=name)
    trained_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert all(t.abs().sum() > 0 for t in trained_b)  # lora_B starts at zero; it has trained
    assert result["metrics"]["evalLoss"] == pytest.approx(single_result["metrics"]["evalLoss"], rel=1e-4)
    # The step loss is a mean over the whole step's target tokens, whichever process holds them.
    assert result["metrics"]["trainLoss"] == pytest.approx(single_result["metrics"]["trainLoss"], rel=1e-4)
    assert result["runPlan"]["worldSize"] == 2 and result["runPlan"]["accumulationSteps"] == 2
    # The world it reports is the one it joined: two processes on one node.
    assert result["world"] == {"worldSize": 2, "nodes": 1, "processesPerNode": 2}
    adapter_config = json.loads((tmp_path / f"zero{stage}" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"


def test_a_single_process_reports_a_world_of_one(single_process):
    _, _, (result, _) = single_process
    assert result["world"] == {"worldSize": 1, "nodes": 1, "processesPerNode": 1}


# Joins the process group the way the trainer does and prints, on rank 0, the world it measured.
REPORT_WORLD = (
    "from finetune_trainer import distributed; d = distributed.setup(); "
    "d.is_main and print('WORLD', d.world.model_dump_json(by_alias=True)); distributed.teardown()"
)


def _reported_world(output: str) -> dict:
    (line,) = [line for line in output.splitlines() if line.startswith("WORLD ")]
    return json.loads(line.removeprefix("WORLD "))


def test_nodes_are_counted_from_the_process_group_not_from_the_launcher():
    # Two torchrun launchers of one process each, node ranks 0 and 1 (two pods of a 2-node job,
    # here on one host): the group they join holds two nodes of one process, world size 2.
    port = free_port()
    launchers = [
        subprocess.Popen([TORCHRUN, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
                          "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python", sys.executable, "-c",
                          REPORT_WORLD],
                         env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=180)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert _reported_world(outputs[0]) == {"worldSize": 2, "nodes": 2, "processesPerNode": 1}


def test_zero3_dora_and_full_save_complete_weights(single_process):
    tmp_path, dataset, _ = single_process
    _, dora = train(tmp_path, dataset, "zero3-dora", 2, **{"distributed.zeroStage": 3, "method.type": "dora",
                                                          "training.maxSteps": 2})
    magnitudes = [t for n, t in dora.items() if "lora_magnitude_vector" in n]
    assert magnitudes and all(t.numel() > 0 for t in magnitudes)

    from finetune_trainer import presets

    result, state = train(tmp_path, dataset, "zero3-full", 2, **{
        "distributed.zeroStage": 3, "distributed.offload": "parameters", "method.type": "full", "training.maxSteps": 2,
    })
    base, _ = presets.build_preset("tiny-llama", torch.float32, torch.device("cpu"))
    expected = {k: v.shape for k, v in base.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    assert {k: v.shape for k, v in state.items()} == expected
    assert result["metrics"]["steps"] == 2
    changed = [k for k in expected if not torch.equal(state[k], base.state_dict()[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed  # trained, not the initial weights


def test_deepspeed_never_jit_compiles_its_cpu_shm_op_at_start():
    # Compiling it costs over a minute at every trainer pod start on CPU nodes (and needs a
    # C++ compiler); unless it was prebuilt, DeepSpeed is told it is unavailable.
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    from finetune_trainer import distributed

    assert not installed_ops.get("deepspeed_shm_comm")
    ops = deepspeed.ops.__compatible_ops__
    saved = ops.get("deepspeed_shm_comm")
    try:
        ops["deepspeed_shm_comm"] = True
        distributed._skip_unbuilt_shm_allreduce(deepspeed)
        assert ops["deepspeed_shm_comm"] is False
    finally:
        ops["deepspeed_shm_comm"] = saved
