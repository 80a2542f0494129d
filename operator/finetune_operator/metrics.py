"""The operator's Prometheus metrics (served on FINETUNE_METRICS_PORT, /metrics).

Names follow the Prometheus conventions: a `finetune_` namespace, base units (seconds),
`_total` for counters. Durations are observed when the operator sees a phase transition; the
status records each transition, so a restarted operator does not count one twice.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

JOBS = Gauge("finetune_jobs", "FineTuneJobs known to this operator, by phase.", ["phase"])
RECONCILE_SECONDS = Histogram("finetune_reconcile_duration_seconds", "Time to reconcile one FineTuneJob.",
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter("finetune_reconcile_errors_total", "Reconciles that raised an error.")
START_SECONDS = Histogram("finetune_job_start_latency_seconds",
                          "Time from a FineTuneJob's creation until its trainer first runs.", buckets=DURATION_BUCKETS)
PROVISIONING_SECONDS = Histogram("finetune_provisioning_duration_seconds",
                                 "Time from a job's NodePool request until its trainer pods are scheduled.",
                                 buckets=DURATION_BUCKETS)
JOB_SECONDS = Histogram("finetune_job_duration_seconds", "Time from creation to Succeeded or Failed.",
                        ["outcome"], buckets=DURATION_BUCKETS)
STATUS_WRITES = Counter("finetune_status_writes_total",
                        "FineTuneJob status PATCHes; sent only when the status changes.")
RETRIES = Counter("finetune_trainer_retries_total", "Failed trainer pods, by classified reason.", ["reason"])

_phases: dict[tuple[str, str], str] = {}


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Track the phase of every job this process has seen, and publish the counts."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    counts: dict[str, int] = {}
    for value in _phases.values():
        counts[value] = counts.get(value, 0) + 1
    for phase_name in ("Pending", "Provisioning", "Running", "Suspended", "Succeeded", "Failed"):
        JOBS.labels(phase=phase_name).set(counts.get(phase_name, 0))
