"""`kubectl finetune` (cli/kubectl_finetune) speaks the trainer's and the operator's protocol:
it reads what the trainer's own Reporter writes, strips the trainer's own error prefix, selects
the pods and the container the operator's own builders create, shows durations the way the
status does, and types none of those facts itself."""

from __future__ import annotations

import ast
import json
import asyncio
import logging
import math
from pathlib import Path

import pytest
import yaml
from factories import make_job

import finetune_trainer.cli as trainer_cli
from finetune_operator import children, kube, naming
from finetune_operator.api import API_VERSION, GROUP
from finetune_operator.progress import ProgressReport, format_eta, status_progress
from finetune_operator.settings import OperatorSettings
from finetune_trainer import protocol
from finetune_trainer.config import ReportingConfig
from finetune_trainer.protocol import EXIT_USER_ERROR, format_duration
from finetune_trainer.reporting import Reporter
from kubectl_finetune import cluster, local
from kubectl_finetune.main import CLUSTER_COMMANDS, build_parser
from kubectl_finetune.progress import eta_text, progress_from_log, progress_line

CLI_DIR = Path(local.__file__).parent
SETTINGS = OperatorSettings(trainer_image="registry.local/trainer:1", default_provisioner="none")
STEP = dict(step=3, total_steps=10, epoch=0, loss=1.25, learning_rate=1e-4, tokens=512,
            tokens_seen=1536, step_seconds=0.5, eta_seconds=3599.6, gpu_memory=None)


# --- one duration format -----------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45, "45s"), (45.4, "45s"), (59.6, "1m00s"), (60, "1m00s"), (750, "12m30s"),
    (3599.5, "1h00m"), (3720, "1h02m"), (3723, "1h02m"), (36000, "10h00m"), (-3, "0s"),
    (math.inf, "?"), (math.nan, "?"),
])
def test_one_duration_format(seconds, text):
    assert format_duration(seconds) == text
    assert eta_text(seconds) == text  # a local run's records carry seconds
    assert format_eta(seconds) == (None if not math.isfinite(seconds) else text)


def test_the_cli_shows_the_status_eta_as_the_operator_wrote_it():
    progress = status_progress(ProgressReport(step=3, totalSteps=10, eta=750.4))
    assert progress["eta"] == "12m30s"
    assert eta_text(progress["eta"]) == "12m30s" and "eta 12m30s" in progress_line(progress)
    assert eta_text(None) == "?" and format_eta(None) is None


def test_the_trainer_logs_the_same_duration(caplog):
    reporter = Reporter(ReportingConfig(), is_main=True)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.reporting"):
        reporter.step(**STEP)
    reporter.close()
    assert "eta 1h00m" in caplog.text


# --- the trainer's progress records ------------------------------------------------------------

def test_progress_from_a_log_the_trainer_wrote(capsys):
    reporter = Reporter(ReportingConfig(), is_main=True)  # no progress file: stdout lines
    reporter.started(10, 0, global_batch_size=8, epochs=3)
    reporter.step(**STEP)
    reporter.evaluated(3, 1.5)
    reporter.close()
    stdout = capsys.readouterr().out
    log = "\n".join(["12:00:00 INFO [rank 0] loading the model", stdout, "trailing noise {not json"])
    record = progress_from_log(log)
    assert record is not None and record["event"] == protocol.PROGRESS_EVENT
    assert (record["step"], record["totalSteps"], record["loss"]) == (3, 10, 1.25)  # the eval after it is skipped
    assert progress_line(record).startswith("[#########.....................]  30%  step 3/10  loss 1.2500")
    assert progress_line(record).endswith("eta 1h00m")
    assert progress_from_log("nothing here\n" + protocol.PROGRESS_PREFIX + "{broken") is None


def test_a_local_run_draws_the_trainers_progress_file(tmp_path, capsys):
    progress_file = tmp_path / "progress.jsonl"
    reporter = Reporter(ReportingConfig(progress_file=str(progress_file)), is_main=True)
    reporter.started(10, 0, global_batch_size=8, epochs=3)
    reporter.step(**STEP)
    reporter.evaluated(3, 1.5)
    reporter.close()

    class Exited:
        def poll(self):
            return 0

    local._follow(Exited(), progress_file)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "step 3/10" in lines[0] and lines[0].endswith("eta 1h00m"), lines


def test_a_trainer_user_error_is_shown_without_its_prefix(capsys):
    assert trainer_cli._fail("data.jsonl:7: not JSON", EXIT_USER_ERROR, None) == EXIT_USER_ERROR
    stderr = capsys.readouterr().err
    assert local.failure_reason("12:00:00 INFO [rank 0] start\n" + stderr, EXIT_USER_ERROR) == "data.jsonl:7: not JSON"
    assert local.failure_reason("", 1) == "exit code 1"


# --- the operator's objects ----------------------------------------------------------------------

def test_logs_come_from_the_pods_and_container_the_operator_creates(monkeypatch, capsys):
    job = make_job()
    template = children.build_job(job, SETTINGS)["spec"]["template"]
    pod = {"metadata": {"name": "demo-trainer-0-abc", "creationTimestamp": "2026-01-01T00:00:00Z",
                        "labels": template["metadata"]["labels"]}}
    calls = {}

    async def list_(kind, namespace, selector=None, fields=None):
        calls["list"] = (kind, namespace, selector)
        return [pod] if selector.items() <= pod["metadata"]["labels"].items() else []

    class Response:
        text = "the log\n"

    class Api:
        namespace = "default"

        def call_api(self, method, *, version, namespace, url, params):
            calls["log"] = (method, version, namespace, url, params)

            class Context:
                async def __aenter__(self):
                    return Response()

                async def __aexit__(self, *exc):
                    return False
            return Context()

    async def get(kind, namespace, name):
        return {"metadata": {"name": name, "namespace": namespace}, "status": {}}

    async def client():
        return Api()

    monkeypatch.setattr(kube, "list_", list_)
    monkeypatch.setattr(kube, "get", get)
    monkeypatch.setattr(kube, "client", client)
    code = asyncio.run(cluster.cmd_logs(build_parser().parse_args(["logs", "demo", "-n", "team-a", "--tail", "7"])))
    assert code == 0 and capsys.readouterr().out == "the log\n"
    assert calls["list"] == ("Pod", "team-a", {naming.JOB_LABEL: "demo"})
    method, version, namespace, url, params = calls["log"]
    assert (method, version, namespace, url) == ("GET", "v1", "team-a", "pods/demo-trainer-0-abc/log")
    assert params == {"container": children.TRAINER_CONTAINER, "tailLines": "7"}
    assert params["container"] in [c["name"] for c in template["spec"]["containers"]]


# --- no protocol fact typed twice ----------------------------------------------------------------

def _facts() -> dict[str, str]:
    """Values the CLI must import, never spell: name -> value."""
    facts = {name: value for name, value in vars(protocol).items() if name.isupper() and isinstance(value, str)}
    facts |= {"naming.JOB_LABEL": naming.JOB_LABEL, "naming.MANAGED_BY": naming.MANAGED_BY,
              "naming.COMPONENT_LABEL": naming.COMPONENT_LABEL, "children.TRAINER_CONTAINER": children.TRAINER_CONTAINER,
              "api.GROUP": GROUP, "api.API_VERSION": API_VERSION, "trainer module": trainer_cli.__name__}
    facts |= {f"kube.RESOURCES[{kind}]": plural for kind, (_, plural) in kube.RESOURCES.items()}
    return facts


# The CRD's status.progress field shares its name with the progress event; the CLI reads that
# field (status["progress"]), which is the API's fact, not the trainer's.
ALLOWED = {"progress"}


def _strings(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def retyped(path: Path) -> dict[str, str]:
    """Each re-typed fact's name -> where (file:line: the string)."""
    found = {}
    for line, text in _strings(path):
        for name, value in _facts().items():
            # Plain words (a container name, a plural) only as a whole string; file names,
            # prefixes and labels anywhere in one (an f-string's parts are strings too).
            if text not in ALLOWED and (text == value or (not value.strip().isalpha() and value.strip() in text)):
                found[name] = f"{path.name}:{line}: {text!r}"
    return found


def test_the_cli_imports_every_protocol_fact():
    files = sorted(CLI_DIR.glob("*.py"))
    assert {p.name for p in files} >= {"main.py", "local.py", "cluster.py", "progress.py"}
    assert {path.name: retyped(path) for path in files} == {path.name: {} for path in files}


def test_the_retyping_check_catches_a_copy(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text('PREFIX = "FINETUNE_PROGRESS "\nfile = out / "result.json"\n'
                    'params = {"container": "trainer"}\nlabel = f"finetune.ai/job={name}"\n'
                    'reason = line.removeprefix("finetune-trainer: error: ")\n')
    assert set(retyped(copy)) == {"PROGRESS_PREFIX", "RESULT_FILE", "children.TRAINER_CONTAINER",
                                  "naming.JOB_LABEL", "api.GROUP", "USER_ERROR_PREFIX"}


def test_the_old_plugin_module_is_gone():
    assert not (Path(naming.__file__).parent / "plugin.py").exists()


def test_a_local_run_rejects_what_the_api_server_rejects(tmp_path):
    """No API server checks a local run's manifest: the spec's rules, in Python, do."""
    from kubectl_finetune import CliError, local

    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "q"},
        "spec": {"baseModel": {"source": "preset://tiny-llama"}, "dataset": {"source": "pvc://data/x.jsonl"},
                 "method": {"type": "qlora"}, "resources": {"accelerator": "none"},
                 "output": {"destination": "pvc://models/q"}},
    }))
    with pytest.raises(CliError, match=r"^.*job.yaml: spec: method.type qlora needs a GPU"):
        local.load_job(str(manifest))


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"run", *CLUSTER_COMMANDS}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, (name, action.dest)
    args = parser.parse_args(["list", "-A", "--kubeconfig", "k", "--context", "c"])
    assert (args.all_namespaces, args.kubeconfig, args.context) == (True, "k", "c")


def _pod(index: int, created: str) -> dict:
    return {"metadata": {"name": f"p{index}-{created}", "creationTimestamp": created,
                         "annotations": {naming.COMPLETION_INDEX: str(index)}}}


def test_logs_pick_the_newest_pod_of_a_node_index_or_the_attempt_before():
    pods = [_pod(0, "1"), _pod(1, "1"), _pod(0, "2"), _pod(1, "2"), _pod(0, "3")]  # oldest first
    assert cluster.pick_pod(pods, 0, previous=False)["metadata"]["name"] == "p0-3"
    assert cluster.pick_pod(pods, 0, previous=True)["metadata"]["name"] == "p0-2"
    assert cluster.pick_pod(pods, 1, previous=False)["metadata"]["name"] == "p1-2"
    assert cluster.pick_pod([_pod(0, "1")], 0, previous=True) is None
    assert cluster.pick_pod(pods, 2, previous=False) is None


def test_no_kubeconfig_gets_a_hint_not_a_traceback(tmp_path):
    assert "pass --kubeconfig" in cluster.no_kubeconfig_hint(None, {}, tmp_path)
    assert cluster.no_kubeconfig_hint("k", {}, tmp_path) is None
    assert cluster.no_kubeconfig_hint(None, {"KUBECONFIG": "k"}, tmp_path) is None
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("{}")
    assert cluster.no_kubeconfig_hint(None, {}, tmp_path) is None


def _manifest(tmp_path, **spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "q"},
        "spec": {"baseModel": {"source": "preset://tiny-llama"}, "dataset": {"source": "pvc://data/x.jsonl"},
                 "output": {"destination": "pvc://models/q"}, **spec}}))
    return str(path)


def test_a_local_run_reads_the_apis_names_only_and_says_every_problem(tmp_path):
    from kubectl_finetune import CliError

    # snake_case is what the API server would refuse as an unknown field: refused here too, not trained with.
    with pytest.raises(CliError, match=r"spec\.training\.learning_rate: unknown field .*camelCase"):
        local.load_job(_manifest(tmp_path, training={"learning_rate": 0.1}))
    with pytest.raises(CliError) as caught:
        local.load_job(_manifest(tmp_path, training={"epochs": 0, "warmupRatio": 2}))
    assert "spec.training.epochs:" in str(caught.value) and "spec.training.warmupRatio:" in str(caught.value)


def test_the_local_bar_ends_full_when_the_last_record_has_no_total(tmp_path, capsys):
    progress_file = tmp_path / "progress.jsonl"
    records = [{"event": protocol.PROGRESS_EVENT, "step": 60, "totalSteps": 60},
               {"event": protocol.PROGRESS_EVENT, "step": 60, "evalLoss": 1.0}]
    progress_file.write_text("\n".join(map(json.dumps, records)) + "\n")

    class Exited:
        def poll(self):
            return 0

    local._follow(Exited(), progress_file)
    lines = capsys.readouterr().out.splitlines()
    assert all("100%" in line and "step 60/60" in line for line in lines), lines


def test_a_failed_local_run_leaves_no_work_directory_or_empty_output(tmp_path, monkeypatch, capsys):
    import tempfile

    from kubectl_finetune import CliError

    data, models, scratch = (tmp_path / d for d in ("data", "models", "tmp"))
    for d in (data, models, scratch):
        d.mkdir()
    (data / "x.jsonl").write_text('{"text": "fine"}\n{not json\n')
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = build_parser().parse_args(["run", "--local", _manifest(tmp_path, resources={"accelerator": "none"}),
                                      "--volume", f"data={data}", "--volume", f"models={models}"])
    with pytest.raises(CliError, match=r"trainer failed.*pvc://data/x\.jsonl:2"):
        local.run_local(args)
    assert list(scratch.iterdir()) == [] and list(models.iterdir()) == []
    out = capsys.readouterr()
    assert out.err == "" and "  | " in out.out  # the log's tail; the one error line is main's to print


def test_status_shows_the_plan_the_trainer_chose_once_it_reported_it():
    job = {"metadata": {"name": "q"}, "status": {"phase": "Running", "progress": {
        "step": 3, "totalSteps": 48, "percent": 6, "globalBatchSize": 2, "epochs": 16}}}
    lines = cluster.status_lines(job)
    assert "  plan: 16 epoch(s) of batch 2" in lines
    older = {"metadata": {"name": "q"}, "status": {"phase": "Running", "progress": {"step": 3, "totalSteps": 48}}}
    assert not any(line.startswith("  plan:") for line in cluster.status_lines(older))
