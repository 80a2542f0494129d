"""Progress for machines (JSON lines, Prometheus) and for people (log lines).

Only rank 0 reports. Progress records are one JSON object per line, written to
reporting.progressFile, or to stdout prefixed with PROGRESS_PREFIX when no file is set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from finetune_trainer.config import ReportingConfig
from finetune_trainer.protocol import PROGRESS_EVENT, PROGRESS_PREFIX, format_duration

log = logging.getLogger(__name__)


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def bind_address(host: str, environ: dict[str, str] | None = None) -> str:
    """reporting.metricsHost with each $(VAR) replaced by that environment variable (the operator
    renders $(POD_IP), set from the downward API), so one config shared by every pod of a job
    binds each pod on its own IP."""
    env = os.environ if environ is None else environ

    def sub(m: re.Match) -> str:
        if m.group(1) not in env or not env[m.group(1)]:
            raise ValueError(f"reporting.metricsHost {host!r}: environment variable {m.group(1)} is not set")
        return env[m.group(1)]
    return _VAR.sub(sub, host)


class Metrics:
    """The Prometheus endpoint (a private registry, so several trainers can live in one test)."""

    def __init__(self, host: str, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()

        def gauge(name, doc):
            return Gauge(f"finetune_trainer_{name}", doc, registry=self.registry)

        self.loss = gauge("loss", "Training loss of the last optimizer step")
        self.eval_loss = gauge("eval_loss", "Loss on the validation split")
        self.learning_rate = gauge("learning_rate", "Learning rate of the last optimizer step")
        self.step = gauge("step", "Optimizer steps done")
        self.total_steps = gauge("total_steps", "Optimizer steps planned")
        self.tokens_per_second = gauge("tokens_per_second", "Tokens per second over the last step, all processes")
        self.tokens_seen = Counter("finetune_trainer_tokens", "Tokens trained on, all processes", registry=self.registry)
        self.gpu_memory = gauge("gpu_memory_allocated_bytes", "Peak GPU memory allocated on rank 0")
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()


class ProgressPusher:
    """Sends the latest progress record to the operator from a background thread.

    Only the newest record matters, so a slow or unreachable operator never slows training:
    records that arrive while a post is in flight replace each other, and failures are logged
    (at most once a minute) and retried with the next record."""

    def __init__(self, url: str, token_file: str | None, min_interval: float = 2.0):
        self.url, self.token_file, self.min_interval = url, token_file, min_interval
        self._latest: dict[str, Any] | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._last_warning = 0.0
        self.thread = threading.Thread(target=self._run, name="progress-pusher", daemon=True)
        self.thread.start()

    def offer(self, record: dict[str, Any]) -> None:
        with self._wake:
            self._latest = record
            self._wake.notify()

    def _post(self, record: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token_file:
            with open(self.token_file) as f:  # projected tokens rotate: read it every time
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        request = urllib.request.Request(self.url, data=json.dumps(record).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._latest is None and not self._closed:
                    self._wake.wait()
                record, self._latest = self._latest, None
                closed = self._closed
            if record is not None:
                try:
                    self._post(record)
                except (OSError, urllib.error.URLError) as exc:
                    if time.monotonic() - self._last_warning > 60:
                        self._last_warning = time.monotonic()
                        log.warning("could not report progress to the operator: %s", exc)
            if closed:
                return
            time.sleep(self.min_interval)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.thread.join(timeout=15)


class Reporter:
    def __init__(self, config: ReportingConfig, is_main: bool):
        self.is_main = is_main
        self.shape: dict[str, int] = {}
        self.stream = None
        self.metrics = None
        self.pusher = None
        if not is_main:
            return
        if config.progress_file:
            self.stream = open(config.progress_file, "a", buffering=1)
        self.pusher = ProgressPusher(config.progress_url, config.progress_token_file) if config.progress_url else None
        if config.metrics_port:
            host = bind_address(config.metrics_host)
            self.metrics = Metrics(host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, config.metrics_port)

    def emit(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps({"time": round(time.time(), 3), **record})
        if self.stream is not None:
            self.stream.write(line + "\n")
        else:
            sys.stdout.write(PROGRESS_PREFIX + line + "\n")
            sys.stdout.flush()

    def started(self, total_steps: int, start_step: int, *, global_batch_size: int, epochs: int, **details: Any) -> None:
        # The run's shape, which auto settings chose here: every progress record repeats it, so
        # the job's status shows it whichever record reached the operator.
        self.shape = {"globalBatchSize": global_batch_size, "epochs": epochs}
        if self.metrics:
            self.metrics.total_steps.set(total_steps)
            self.metrics.step.set(start_step)
        self.emit({"event": "started", "step": start_step, "totalSteps": total_steps, **self.shape, **details})

    def step(self, *, step: int, total_steps: int, epoch: int, loss: float, learning_rate: float,
             tokens: int, tokens_seen: int, step_seconds: float, eta_seconds: float, gpu_memory: int | None) -> None:
        if not self.is_main:
            return
        tokens_per_second = tokens / step_seconds if step_seconds > 0 else 0.0
        if self.metrics:
            m = self.metrics
            m.loss.set(loss)
            m.learning_rate.set(learning_rate)
            m.step.set(step)
            m.tokens_per_second.set(tokens_per_second)
            m.tokens_seen.inc(tokens)
            if gpu_memory is not None:
                m.gpu_memory.set(gpu_memory)
        record = {
            "event": PROGRESS_EVENT,
            "step": step,
            "totalSteps": total_steps,
            "percent": round(100.0 * step / total_steps, 2),
            "epoch": epoch,
            "loss": round(loss, 6),
            "learningRate": learning_rate,
            "tokensPerSecond": round(tokens_per_second, 1),
            "tokensSeen": tokens_seen,
            "eta": round(eta_seconds, 1),
            **self.shape,
        }
        if gpu_memory is not None:
            record["gpuMemoryBytes"] = gpu_memory
        self.emit(record)
        if self.pusher is not None:
            self.pusher.offer(record)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s",
            step, total_steps, loss, learning_rate, tokens_per_second, format_duration(eta_seconds),
        )

    def evaluated(self, step: int, eval_loss: float) -> None:
        if self.metrics:
            self.metrics.eval_loss.set(eval_loss)
        self.emit({"event": "eval", "step": step, "evalLoss": round(eval_loss, 6)})
        if self.is_main:
            log.info("step %d  eval loss %.4f", step, eval_loss)

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        if self.stream is not None:
            self.stream.close()
        if self.metrics is not None:
            self.metrics.close()
