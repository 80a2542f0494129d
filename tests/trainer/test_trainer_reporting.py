import http.server
import json
import logging
import threading
import time
import urllib.request

import pytest

from finetune_trainer.config import ReportingConfig
from finetune_trainer.reporting import ProgressPusher, Reporter
from trainer_helpers import PROGRESS_PREFIX, free_port

import prometheus_client  # noqa: F401  (a broken install fails, never skips)


def test_metrics_endpoint_and_progress_file(tmp_path):
    port = free_port()
    progress = tmp_path / "progress.jsonl"
    reporter = Reporter(
        ReportingConfig(progress_file=str(progress), metrics_port=port, metrics_host="127.0.0.1"), is_main=True
    )
    try:
        reporter.started(10, 0, global_batch_size=8, epochs=3)
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
        "globalBatchSize": 8, "epochs": 3,  # what started() was told, in every record
    }
    assert (records[0]["globalBatchSize"], records[0]["epochs"]) == (8, 3)


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


class Receiver:
    """An operator stand-in on 127.0.0.1: records every POST, answers with the next status."""

    def __init__(self, statuses=()):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        self.arrived = threading.Condition()
        self.release = threading.Event()
        self.release.set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.arrived:
                    receiver.requests.append({"path": self.path, "body": body,
                                              "contentType": self.headers.get("Content-Type"),
                                              "authorization": self.headers.get("Authorization")})
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.arrived.notify_all()
                receiver.release.wait(timeout=30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/progress"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout=10), self.requests

    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_the_pusher_posts_each_record_with_the_token_read_at_each_post(tmp_path, receiver):
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    pusher = ProgressPusher(receiver.url, str(token), min_interval=0)
    assert pusher.thread.name == "progress-pusher" and pusher.thread.daemon  # never holds up the exit
    pusher.offer({"step": 1})
    receiver.wait_for(1)
    token.write_text("tok-2\n")  # a projected token rotates
    pusher.offer({"step": 2})
    receiver.wait_for(2)
    pusher.close()
    assert not pusher.thread.is_alive()
    assert receiver.requests == [
        {"path": "/progress", "body": {"step": 1}, "contentType": "application/json", "authorization": "Bearer tok-1"},
        {"path": "/progress", "body": {"step": 2}, "contentType": "application/json", "authorization": "Bearer tok-2"},
    ]


def test_the_pusher_sends_no_token_without_a_token_file_and_the_last_record_on_close(receiver):
    pusher = ProgressPusher(receiver.url, None, min_interval=0)
    pusher.offer({"step": 7})
    pusher.close()  # what was offered before close is still sent
    assert not pusher.thread.is_alive()
    assert receiver.requests == [
        {"path": "/progress", "body": {"step": 7}, "contentType": "application/json", "authorization": None},
    ]
    idle = ProgressPusher(receiver.url, None, min_interval=0)
    idle.close()
    assert not idle.thread.is_alive() and len(receiver.requests) == 1


def test_records_offered_during_a_post_replace_each_other(receiver):
    receiver.release.clear()  # the operator is slow to answer the first post
    pusher = ProgressPusher(receiver.url, None, min_interval=0)
    pusher.offer({"step": 1})
    receiver.wait_for(1)
    pusher.offer({"step": 2})
    pusher.offer({"step": 3})
    receiver.release.set()
    receiver.wait_for(2)
    pusher.close()
    assert receiver.bodies() == [{"step": 1}, {"step": 3}]


def test_failed_posts_are_logged_once_and_retried_with_the_next_record(caplog):
    caplog.set_level(logging.WARNING, logger="finetune_trainer.reporting")
    receiver = Receiver(statuses=[500, 503])
    try:
        pusher = ProgressPusher(receiver.url, None, min_interval=0)
        for n in (1, 2, 3):
            pusher.offer({"step": n})
            receiver.wait_for(n)
        pusher.close()
    finally:
        receiver.close()
    assert not pusher.thread.is_alive()  # the failures did not stop it
    assert receiver.bodies() == [{"step": 1}, {"step": 2}, {"step": 3}]
    warnings = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.reporting"]
    assert warnings == ["could not report progress to the operator: HTTP Error 500: Internal Server Error"]


def test_the_reporter_pushes_step_records_only(tmp_path, receiver):
    token = tmp_path / "token"
    token.write_text("secret")
    reporter = Reporter(ReportingConfig(progress_file=str(tmp_path / "p.jsonl"), progress_url=receiver.url,
                                        progress_token_file=str(token)), is_main=True)
    assert reporter.pusher.min_interval == 2.0
    try:
        reporter.started(4, 0, global_batch_size=8, epochs=3)
        reporter.step(step=1, total_steps=4, epoch=0, loss=2.0, learning_rate=0.1, tokens=10, tokens_seen=10,
                      step_seconds=1.0, eta_seconds=3.0, gpu_memory=None)
        reporter.evaluated(1, 1.5)
    finally:
        reporter.close()
    assert receiver.requests == [{"path": "/progress", "contentType": "application/json",
                                  "authorization": "Bearer secret", "body": {
                                      "event": "progress", "step": 1, "totalSteps": 4, "percent": 25.0, "epoch": 0,
                                      "loss": 2.0, "learningRate": 0.1, "tokensPerSecond": 10.0, "tokensSeen": 10,
                                      "eta": 3.0, "globalBatchSize": 8, "epochs": 3}}]


def test_progress_records_are_appended_line_by_line_and_rounded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_trainer.reporting")
    progress = tmp_path / "progress.jsonl"
    progress.write_text('{"event": "started", "step": 0}\n')  # the run before a resume
    reporter = Reporter(ReportingConfig(progress_file=str(progress)), is_main=True)
    assert reporter.pusher is None  # no progressUrl: nothing to push to
    try:
        before = time.time()
        reporter.started(300, 4, resumedFrom="checkpoint-4", global_batch_size=8, epochs=3)
        after = time.time()
        # Each record is readable as soon as it is emitted (line buffered), not at close.
        lines = progress.read_text().splitlines()
        assert lines[0] == '{"event": "started", "step": 0}'
        started = json.loads(lines[1])
        assert before - 0.001 <= started["time"] <= after + 0.001 and started["time"] == round(started["time"], 3)
        assert started | {"time": 0} == {"time": 0, "event": "started", "step": 4, "totalSteps": 300,
                                         "resumedFrom": "checkpoint-4", "globalBatchSize": 8, "epochs": 3}
        reporter.step(step=100, total_steps=300, epoch=2, loss=1.23456789, learning_rate=3e-4, tokens=1000,
                      tokens_seen=5000, step_seconds=3.0, eta_seconds=12.345, gpu_memory=2048)
        reporter.step(step=101, total_steps=300, epoch=2, loss=1.0, learning_rate=3e-4, tokens=1000,
                      tokens_seen=6000, step_seconds=0.0, eta_seconds=0.04, gpu_memory=None)
        reporter.evaluated(101, 0.98765432)
        records = [json.loads(line) | {"time": 0} for line in progress.read_text().splitlines()[2:]]
    finally:
        reporter.close()
    assert records == [
        {"time": 0, "event": "progress", "step": 100, "totalSteps": 300, "percent": 33.33, "epoch": 2,
         "loss": 1.234568, "learningRate": 3e-4, "tokensPerSecond": 333.3, "tokensSeen": 5000, "eta": 12.3,
         "globalBatchSize": 8, "epochs": 3, "gpuMemoryBytes": 2048},
        # A step that took no measurable time has no throughput (not a division by zero).
        {"time": 0, "event": "progress", "step": 101, "totalSteps": 300, "percent": 33.67, "epoch": 2,
         "loss": 1.0, "learningRate": 3e-4, "tokensPerSecond": 0.0, "tokensSeen": 6000, "eta": 0.0,
         "globalBatchSize": 8, "epochs": 3},
        {"time": 0, "event": "eval", "step": 101, "evalLoss": 0.987654},
    ]
    # And for people, one log line each.
    assert [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.reporting"] == [
        "step 100/300  loss 1.2346  lr 3.00e-04  333 tok/s  eta 12s",
        "step 101/300  loss 1.0000  lr 3.00e-04  0 tok/s  eta 0s",
        "step 101  eval loss 0.9877",
    ]


def scrape(port: int, host: str = "127.0.0.1") -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()


def test_metrics_endpoint_on_a_host_from_the_environment(monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="finetune_trainer.reporting")
    monkeypatch.setenv("FINETUNE_TEST_POD_IP", "127.0.0.3")
    port = free_port()
    reporter = Reporter(ReportingConfig(metrics_port=port, metrics_host="$(FINETUNE_TEST_POD_IP)"), is_main=True)
    try:
        reporter.started(50, 20, global_batch_size=8, epochs=3)  # resumed at step 20
        resumed = scrape(port, "127.0.0.3")
        with pytest.raises(OSError):  # bound on the pod's own address only
            scrape(port, "127.0.0.1")
        reporter.step(step=21, total_steps=50, epoch=1, loss=0.5, learning_rate=1e-3, tokens=300, tokens_seen=300,
                      step_seconds=1.0, eta_seconds=29.0, gpu_memory=4096)
        reporter.step(step=22, total_steps=50, epoch=1, loss=0.25, learning_rate=1e-3, tokens=200, tokens_seen=500,
                      step_seconds=0.0, eta_seconds=28.0, gpu_memory=None)
        body = scrape(port, "127.0.0.3")
    finally:
        reporter.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.reporting"]
    assert logged[0] == f"metrics on http://127.0.0.3:{port}/metrics"
    assert "finetune_trainer_step 20.0" in resumed.splitlines() and "finetune_trainer_total_steps 50.0" in resumed
    metrics = {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if line and line[0] != "#"}
    assert metrics["finetune_trainer_step"] == 22 and metrics["finetune_trainer_loss"] == 0.25
    assert metrics["finetune_trainer_tokens_total"] == 500
    assert metrics["finetune_trainer_tokens_per_second"] == 0.0
    assert metrics["finetune_trainer_gpu_memory_allocated_bytes"] == 4096  # the last step that measured it
    helps = [line for line in body.splitlines() if line.startswith("# HELP") and "_created " not in line]
    assert helps == [
        "# HELP finetune_trainer_loss Training loss of the last optimizer step",
        "# HELP finetune_trainer_eval_loss Loss on the validation split",
        "# HELP finetune_trainer_learning_rate Learning rate of the last optimizer step",
        "# HELP finetune_trainer_step Optimizer steps done",
        "# HELP finetune_trainer_total_steps Optimizer steps planned",
        "# HELP finetune_trainer_tokens_per_second Tokens per second over the last step, all processes",
        "# HELP finetune_trainer_tokens_total Tokens trained on, all processes",
        "# HELP finetune_trainer_gpu_memory_allocated_bytes Peak GPU memory allocated on rank 0",
    ]
    # With a progress file unset, the records went to stdout.
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line.removeprefix(PROGRESS_PREFIX))["event"] for line in lines] == ["started", "progress",
                                                                                          "progress"]


def test_other_ranks_open_no_file_no_endpoint_and_push_nothing(tmp_path, receiver, capsys):
    port = free_port()
    progress = tmp_path / "progress.jsonl"
    reporter = Reporter(ReportingConfig(progress_file=str(progress), metrics_port=port, metrics_host="127.0.0.1",
                                        progress_url=receiver.url), is_main=False)
    reporter.started(10, 0, global_batch_size=8, epochs=3)
    reporter.step(step=1, total_steps=10, epoch=0, loss=1.0, learning_rate=0.1, tokens=1, tokens_seen=1,
                  step_seconds=1.0, eta_seconds=9.0, gpu_memory=1)
    reporter.evaluated(1, 1.0)
    reporter.close()
    assert not progress.exists() and capsys.readouterr().out == "" and receiver.requests == []
    with pytest.raises(OSError):
        scrape(port)


def test_a_progress_line_on_stdout_is_the_prefix_and_one_json_record(capsys):
    reporter = Reporter(ReportingConfig(), is_main=True)
    reporter.evaluated(5, 0.5)
    reporter.close()
    out = capsys.readouterr().out
    assert out.startswith(PROGRESS_PREFIX + "{") and out.endswith("}\n") and out.count("\n") == 1
    assert json.loads(out.removeprefix(PROGRESS_PREFIX)) | {"time": 0} == {"time": 0, "event": "eval", "step": 5,
                                                                          "evalLoss": 0.5}


def test_bind_address_replaces_every_variable_and_names_a_missing_one():
    from finetune_trainer.reporting import bind_address

    env = {"A_1": "10.0.0.1", "port_suffix": "x", "EMPTY": ""}
    assert bind_address("$(A_1)-$(port_suffix)", env) == "10.0.0.1-x"
    assert bind_address("$A_1 $(1X) $()", env) == "$A_1 $(1X) $()"  # not $(NAME): left as written
    with pytest.raises(ValueError) as missing:
        bind_address("$(A_1)$(POD_IP)", env)
    assert str(missing.value) == "reporting.metricsHost '$(A_1)$(POD_IP)': environment variable POD_IP is not set"
    with pytest.raises(ValueError, match=r"^reporting.metricsHost '\$\(EMPTY\)': environment variable EMPTY is not set$"):
        bind_address("$(EMPTY)", env)


def test_bind_address_reads_the_process_environment_by_default(monkeypatch):
    from finetune_trainer.reporting import bind_address

    monkeypatch.setenv("FINETUNE_TEST_POD_IP", "127.0.0.9")
    assert bind_address("$(FINETUNE_TEST_POD_IP)") == "127.0.0.9"
    monkeypatch.delenv("FINETUNE_TEST_POD_IP")
    with pytest.raises(ValueError, match="FINETUNE_TEST_POD_IP is not set"):
        bind_address("$(FINETUNE_TEST_POD_IP)")
