"""`kubectl finetune run --local`: the manifest's trainer config, rendered as the operator renders
it (pvc:// claims mapped to local directories), run by the trainer in a subprocess here."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import finetune_trainer.cli as trainer_cli
import yaml
from finetune_operator.api import FineTuneJob
from finetune_operator.sources import UnsupportedSource
from finetune_operator.spec_terms import in_spec_terms
from finetune_operator.trainer_config import render
from finetune_trainer.protocol import (
    MODEL_MANIFEST_FILE,
    OWNER_FILE,
    PROGRESS_EVENT,
    RESULT_FILE,
    USER_ERROR_PREFIX,
)
from finetune_trainer.result import InvalidResult, parse_result
from pydantic import ValidationError

from . import CliError
from .progress import draw, progress_line


def load_job(path: str) -> FineTuneJob:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {exc}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise CliError(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    raw = jobs[0]
    raw.setdefault("metadata", {}).setdefault("namespace", "local")
    raw["metadata"].setdefault("uid", "local")
    try:
        # By the API's own (camelCase) names only, as the API server reads it: a snake_case key
        # such as learning_rate is an unknown field here too, not a setting.
        return FineTuneJob.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise CliError(f"{path}: {describe(exc)}") from None


def describe(error: ValidationError, root: tuple[str, ...] = ()) -> str:
    """Every problem of a validation error, each with the manifest's field path, in one line."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in (*root, *item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (the API's names are camelCase, as in `kubectl explain finetunejob.spec`)"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def parse_volumes(pairs: list[str]) -> dict[str, str]:
    volumes = {}
    for pair in pairs:
        claim, sep, directory = pair.partition("=")
        if not sep or not claim or not directory:
            raise CliError(f"--volume {pair!r}: expected CLAIM=DIR")
        volumes[claim] = str(Path(directory).expanduser().resolve())
    return volumes


def failure_reason(log_text: str, returncode: int) -> str:
    """The trainer's last log line, without its user-error prefix."""
    tail = [line for line in log_text.splitlines() if line.strip()]
    return tail[-1].removeprefix(USER_ERROR_PREFIX) if tail else f"exit code {returncode}"


def _follow(proc: subprocess.Popen, progress_file: Path) -> None:
    """Draw each new progress record until the trainer exits. A record that leaves out the
    total (the last one, after evaluation) keeps the one seen before, so the bar ends full."""
    seen, total = 0, None
    while True:
        done = proc.poll() is not None
        if progress_file.exists():
            lines = progress_file.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    record = json.loads(line)
                    if record.get("event") == PROGRESS_EVENT:
                        total = record.get("totalSteps") or total
                        draw(progress_line({**record, "totalSteps": total}))
                except (json.JSONDecodeError, TypeError, AttributeError):
                    pass
            seen = len(lines)
        if done:
            return
        time.sleep(0.5)


def run_local(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    claim_dirs = parse_volumes(args.volume)
    # The work directory (config, progress, the trainer's log) goes when the run ends, whatever
    # the outcome; so does an output directory this run created and left empty.
    with tempfile.TemporaryDirectory(prefix=f"finetune-{job.metadata.name}-") as work:
        workdir = Path(work)
        progress_file = workdir / "progress.jsonl"
        try:
            config = render(job, claim_dirs=claim_dirs,
                            reporting={"progressFile": str(progress_file), "metricsPort": 0})
        except UnsupportedSource as exc:
            raise CliError(f"spec.{exc}") from None
        except ValidationError as exc:
            raise CliError(describe(exc, ("spec",))) from None
        output_dir = Path(config["output"]["dir"])
        created = not output_dir.exists()
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            return _train(job, config, workdir, progress_file, output_dir, claim_dirs)
        except BaseException:
            # Nothing but the owner record the trainer writes first: nothing to keep.
            if created and output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= {OWNER_FILE}:
                shutil.rmtree(output_dir)
            raise


def _train(job: FineTuneJob, config: dict, workdir: Path, progress_file: Path, output_dir: Path,
           claim_dirs: dict[str, str]) -> int:
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log_file = workdir / "trainer.log"
    print(f"training {job.metadata.name}: {job.spec.method.type} on {job.spec.base_model.source}", flush=True)

    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", trainer_cli.__name__, "--config", str(config_file)],
                                stdout=log, stderr=subprocess.STDOUT)
        _follow(proc, progress_file)
    if sys.stdout.isatty():
        print()
    if proc.returncode != 0:
        # The log goes with the work directory: its end, where the cause is, on stdout (stderr
        # keeps its one error line).
        tail = log_file.read_text().splitlines()[-20:]
        sys.stdout.write("".join(f"  | {line}\n" for line in tail))
        # In the manifest's terms (spec.dataset.source: pvc://data/...), as the cluster says it.
        reason = in_spec_terms(failure_reason(log_file.read_text(), proc.returncode), job, claim_dirs)
        raise CliError(f"trainer failed (exit {proc.returncode}): {reason}")

    result_path = output_dir / RESULT_FILE
    if not result_path.exists():
        raise CliError(f"trainer exited 0 but wrote no {result_path}")
    try:
        result = parse_result(result_path.read_text())
    except InvalidResult as exc:
        raise CliError(f"{result_path}: {exc}") from None
    metrics = result.metrics
    nan = math.nan
    print(f"done: {metrics.steps} steps, train loss {metrics.train_loss:.4f}, eval loss "
          f"{nan if metrics.eval_loss is None else metrics.eval_loss:.4f} "
          f"(initial {nan if metrics.initial_eval_loss is None else metrics.initial_eval_loss:.4f})")
    print(f"output: {output_dir}")
    print(f"{result.weights_file}: sha256 {result.files[result.weights_file].sha256}")
    if (output_dir / MODEL_MANIFEST_FILE).exists():
        print(f"model manifest: {output_dir / MODEL_MANIFEST_FILE}")
    return 0
