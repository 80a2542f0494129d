"""The trainer's side of the contract with the operator (torch-free).

Exit codes, file names and the progress-line prefix live here so the operator can import
them instead of copying magic values, and the failed run's termination message is written and
read by the same pair of functions.
"""

from __future__ import annotations

import json

# Exit codes. Kubernetes shows them on the pod; the operator maps them to conditions.
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1  # a bug or an environment failure: a traceback is printed
EXIT_USER_ERROR = 2  # bad config or bad data: one clear line, no traceback
EXIT_DESTINATION_IN_USE = 3  # output.dir belongs to another job (its owner file): one line, no traceback
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved, rerunning resumes (128 + 15)

RESULT_FILE = "result.json"
# Written into output.dir before anything else, naming the job that owns it (docs/outputs.md).
OWNER_FILE = ".finetune-owner.json"
MODEL_MANIFEST_FILE = "model.yaml"

# When reporting.progressFile is null, each progress record goes to stdout as one line:
#   FINETUNE_PROGRESS {"step": 3, "totalSteps": 10, ...}
PROGRESS_PREFIX = "FINETUNE_PROGRESS "

# Kubernetes truncates termination messages longer than this.
TERMINATION_MESSAGE_LIMIT = 4096



def failure_message(error: str, exit_code: int) -> str:
    """A failed run's termination message: {"error", "exitCode"} as JSON that fits the limit in
    bytes (the error is shortened, by whole characters, never the JSON cut), so the exit code
    survives torchrun, which exits 1 whatever its worker exited with."""
    def encoded(text: str) -> str:
        return json.dumps({"error": text, "exitCode": exit_code}, separators=(",", ":"), ensure_ascii=False)

    message = encoded(error)
    if len(message.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return message
    low, high = 0, len(error)  # the longest prefix whose message fits
    while low < high:
        mid = (low + high + 1) // 2
        if len(encoded(error[:mid] + "…").encode()) <= TERMINATION_MESSAGE_LIMIT:
            low = mid
        else:
            high = mid - 1
    return encoded(error[:low] + "…")


def parse_failure_message(text: str) -> tuple[int | None, str] | None:
    """(exit code, error) from a message failure_message wrote; None for any other text."""
    if not text.startswith("{"):
        return None
    try:
        reported = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(reported, dict) or "error" not in reported:
        return None
    code = reported.get("exitCode")
    return (code if isinstance(code, int) else None), str(reported["error"])


# The `event` of a progress record after each optimizer step (others: "started", "eval").
PROGRESS_EVENT = "progress"

# A user error (EXIT_USER_ERROR, EXIT_DESTINATION_IN_USE) is this prefix and one line on stderr.
USER_ERROR_PREFIX = "finetune-trainer: error: "


def format_duration(seconds: float) -> str:
    """A duration as people read it: "45s", "12m30s", "1h02m" (rounded to the second).

    One format for the trainer's log lines, the operator's status.progress.eta and the
    `kubectl finetune` progress bar. Negative counts as 0; NaN or infinity is "?"."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
