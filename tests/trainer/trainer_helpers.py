"""Helpers for the trainer tests: tiny datasets, configs, and running the real CLI.

Training runs go through the `finetune-trainer` console script in a subprocess (or under
torchrun for two processes), the same way the pod runs it. Test modules import these
helpers as `trainer_helpers` (a unique name: tests/ has several conftest.py files).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path


BIN = Path(sys.executable).parent
TRAINER = str(BIN / "finetune-trainer")
TORCHRUN = str(BIN / "torchrun")
PROGRESS_PREFIX = "FINETUNE_PROGRESS "


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread per process: on a busy 2-core machine OpenMP's spinning threads
    # make tiny matmuls ~50x slower.
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def arithmetic_chat(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randint(1, 30), r.randint(1, 30)
        rows.append({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})
    return rows


def random_sequences(lengths: list[int], vocab: int, seed: int = 0) -> list:
    """Tokenized examples of the given lengths with random ids; every token but the first is a target."""
    import torch

    from finetune_trainer.data import IGNORE_INDEX, Sequence

    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        sequences.append(Sequence(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:]))
    return sequences


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def make_config(tmp_path: Path, dataset: Path, **overrides) -> dict:
    config = {
        "jobName": "test",
        "baseModel": {"source": "preset://tiny-llama"},
        "dataset": {"path": str(dataset), "validationSplit": 0.1},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}},
        "training": {
            "epochs": 3, "learningRate": 3e-3, "microBatchSize": 2, "globalBatchSize": 4,
            "maxSeqLength": 128, "packing": True, "gradientCheckpointing": True, "seed": 7,
            "warmupSteps": 0,
        },
        "distributed": {"zeroStage": 0},
        "output": {"dir": str(tmp_path / "out")},
        "checkpointing": {"everySteps": 1000, "keep": 2},
        "reporting": {"progressFile": str(tmp_path / "progress.jsonl")},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def write_config(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def run_trainer(config_path: Path, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [TRAINER, "--config", str(config_path)]
    else:
        command = [
            TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--module", "finetune_trainer.cli",
            "--config", str(config_path),
        ]
    return subprocess.run(command, env=trainer_env(), capture_output=True, text=True, timeout=timeout)


def start_trainer(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [TRAINER, "--config", str(config_path)], env=trainer_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_progress(progress_file: Path, process: subprocess.Popen, min_step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early ({process.returncode}):\n{process.stdout.read()}")
        if any(r.get("event") == "progress" and r["step"] >= min_step for r in read_progress(progress_file)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no progress past step {min_step} within {timeout}s")


def read_progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
