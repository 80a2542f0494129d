import json
import urllib.request

import pytest

from finetune_trainer.config import ReportingConfig
from finetune_trainer.reporting import Reporter
from trainer_helpers import PROGRESS_PREFIX, free_port

pytest.importorskip("prometheus_client")


def test_metrics_endpoint_and_progress_file(tmp_path):
    port = free_port()
    progress = tmp_path / "progress.jsonl"
    reporter = Reporter(
        ReportingConfig(progress_file=str(progress), metrics_port=port, metrics_host="127.0.0.1"), is_main=True
    )
    try:
        reporter.started(10, 0)
        reporter.step(step=3, total_steps=10, epoch=0, loss=1.25, learning_rate=1e-4, tokens=512,
                      tokens_seen=1536, step_seconds=0.5, eta_seconds=3.5, gpu_memory=None)
        reporter.evaluated(3, 1.5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        reporter.close()
    metrics = {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if line and line[0] != "#"}
    assert metrics["finetune_trainer_loss"] == 1.25
    assert metrics["finetune_trainer_step"] == 3
    assert metrics["finetune_trainer_total_steps"] == 10
    assert metrics["finetune_trainer_tokens_per_second"] == 1024
    assert metrics["finetune_trainer_tokens_total"] == 512
    assert metrics["finetune_trainer_eval_loss"] == 1.5
    assert metrics["finetune_trainer_learning_rate"] == 1e-4

    records = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [r["event"] for r in records] == ["started", "progress", "eval"]
    assert records[1] | {"time": 0} == {
        "time": 0, "event": "progress", "step": 3, "totalSteps": 10, "percent": 30.0, "epoch": 0,
        "loss": 1.25, "learningRate": 1e-4, "tokensPerSecond": 1024.0, "tokensSeen": 1536, "eta": 3.5,
    }


def test_only_rank_0_reports(tmp_path, capsys):
    reporter = Reporter(ReportingConfig(), is_main=False)
    reporter.emit({"event": "x"})
    reporter.close()
    assert capsys.readouterr().out == ""
    main = Reporter(ReportingConfig(), is_main=True)
    main.emit({"event": "x"})
    main.close()
    line = capsys.readouterr().out
    assert line.startswith(PROGRESS_PREFIX) and json.loads(line[len(PROGRESS_PREFIX):])["event"] == "x"


def test_metrics_bind_on_the_pods_own_ip():
    from finetune_trainer.reporting import bind_address

    assert bind_address("$(POD_IP)", {"POD_IP": "127.0.0.3"}) == "127.0.0.3"
    assert bind_address("0.0.0.0", {}) == "0.0.0.0"
    with pytest.raises(ValueError, match="POD_IP is not set"):
        bind_address("$(POD_IP)", {})
