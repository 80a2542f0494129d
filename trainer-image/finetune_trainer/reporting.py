"""Progress for machines (JSON lines, Prometheus) and for people (log lines).

Only rank 0 reports. Progress records are one JSON object per line, written to
reporting.progressFile, or to stdout prefixed with PROGRESS_PREFIX when no file is set.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from finetune_trainer.config import ReportingConfig
from finetune_trainer.protocol import PROGRESS_PREFIX

log = logging.getLogger(__name__)


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


class Reporter:
    def __init__(self, config: ReportingConfig, is_main: bool):
        self.is_main = is_main
        self.stream = None
        self.metrics = None
        if not is_main:
            return
        if config.progress_file:
            self.stream = open(config.progress_file, "a", buffering=1)
        if config.metrics_port:
            self.metrics = Metrics(config.metrics_host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)

    def emit(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps({"time": round(time.time(), 3), **record})
        if self.stream is not None:
            self.stream.write(line + "\n")
        else:
            sys.stdout.write(PROGRESS_PREFIX + line + "\n")
            sys.stdout.flush()

    def started(self, total_steps: int, start_step: int, **details: Any) -> None:
        if self.metrics:
            self.metrics.total_steps.set(total_steps)
            self.metrics.step.set(start_step)
        self.emit({"event": "started", "step": start_step, "totalSteps": total_steps, **details})

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
            "event": "progress",
            "step": step,
            "totalSteps": total_steps,
            "percent": round(100.0 * step / total_steps, 2),
            "epoch": epoch,
            "loss": round(loss, 6),
            "learningRate": learning_rate,
            "tokensPerSecond": round(tokens_per_second, 1),
            "tokensSeen": tokens_seen,
            "eta": round(eta_seconds, 1),
        }
        if gpu_memory is not None:
            record["gpuMemoryBytes"] = gpu_memory
        self.emit(record)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s",
            step, total_steps, loss, learning_rate, tokens_per_second, _duration(eta_seconds),
        )

    def evaluated(self, step: int, eval_loss: float) -> None:
        if self.metrics:
            self.metrics.eval_loss.set(eval_loss)
        self.emit({"event": "eval", "step": step, "evalLoss": round(eval_loss, 6)})
        if self.is_main:
            log.info("step %d  eval loss %.4f", step, eval_loss)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.metrics is not None:
            self.metrics.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
