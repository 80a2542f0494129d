"""`kubectl finetune run --local`: the quickstart manifest trains here, with no cluster, and a
malformed dataset fails naming its line. (The cluster commands are exercised against the
Helm-installed operator in test_chart.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from kubetools import REPO, VENV_BIN

PLUGIN = str(VENV_BIN / "kubectl-finetune")
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def run_local(manifest: Path, data: Path, models: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PLUGIN, "run", "--local", str(manifest), "--volume", f"data={data}",
                           "--volume", f"models={models}"], capture_output=True, text=True, timeout=400,
                          env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(data.parent)})


def test_quickstart_trains_locally(tmp_path: Path) -> None:
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    shutil.copy(REPO / "examples" / "data" / "quickstart.jsonl", data)
    proc = run_local(QUICKSTART, data, models)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    out = models / "quickstart"
    result = json.loads((out / "result.json").read_text())
    for name, entry in result["files"].items():
        blob = (out / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"] and len(blob) == entry["size"], name
    assert "adapter_model.safetensors" in result["files"]
    metrics = result["metrics"]
    assert metrics["evalLoss"] < metrics["initialEvalLoss"]
    model = yaml.safe_load((out / "model.yaml").read_text())
    assert model["kind"] == "Model" and model["spec"]["adapter"]["sha256"] == result["files"]["adapter_model.safetensors"]["sha256"]
    # progress, then the summary
    lines = proc.stdout.splitlines()
    assert any("step 60/60" in line and "100%" in line for line in lines), proc.stdout
    assert any(line.startswith("done: 60 steps") for line in lines), proc.stdout
    assert f"adapter_model.safetensors: sha256 {result['files']['adapter_model.safetensors']['sha256']}" in proc.stdout


def test_malformed_dataset_names_its_line_and_leaves_no_result(tmp_path: Path) -> None:
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    lines = (REPO / "examples" / "data" / "quickstart.jsonl").read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "unterminated'
    (data / "quickstart.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_local(QUICKSTART, data, models)
    assert proc.returncode != 0
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert "quickstart.jsonl:7:" in errors[0] and "Traceback" not in proc.stderr, errors
    assert not (models / "quickstart" / "result.json").exists()


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    def plugin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PLUGIN, *args], capture_output=True, text=True, timeout=60,
                              env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")})
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("type: lora", "type: lorax"))
    cases = [
        (["run", "--local", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["run", "--local", str(bad), "--volume", f"data={tmp_path}"], "method"),
        (["run", "--local", str(QUICKSTART), "--volume", "data"], "CLAIM=DIR"),
        (["list"], "error:"),
    ]
    for args, words in cases:
        proc = plugin(*args)
        assert proc.returncode != 0, args
        errors = proc.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and words in errors[0], (args, proc.stderr)
