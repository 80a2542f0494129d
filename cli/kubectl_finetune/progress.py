"""The progress bar, and reading progress records out of a trainer's log."""

from __future__ import annotations

import json
import sys
from typing import Any

from finetune_trainer.protocol import PROGRESS_EVENT, PROGRESS_PREFIX, format_duration


def eta_text(value: Any) -> str:
    """status.progress.eta is already formatted (by the operator); a trainer's record has seconds."""
    if value is None:
        return "?"
    if isinstance(value, str):
        return value
    return format_duration(value)


def progress_line(progress: dict[str, Any], width: int = 30) -> str:
    """One line for a status.progress object or a trainer progress record (same camelCase keys)."""
    step, total = progress.get("step") or 0, progress.get("totalSteps") or 0
    fraction = min(step / total, 1.0) if total else 0.0
    filled = int(fraction * width)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%", f"step {step}/{total or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{progress['tokensPerSecond']:,.0f} tok/s")
    parts.append(f"eta {eta_text(progress.get('eta'))}")
    return "  ".join(parts)


def draw(line: str) -> None:
    """Redraw in place on a terminal; one line each otherwise (logs, pipes)."""
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + line)
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_from_log(text: str) -> dict[str, Any] | None:
    """The latest progress record in a trainer log (stdout lines after PROGRESS_PREFIX), or None."""
    for line in reversed(text.splitlines()):
        _, sep, payload = line.partition(PROGRESS_PREFIX)
        if not sep:
            continue
        try:
            record = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == PROGRESS_EVENT:
            return record
    return None
