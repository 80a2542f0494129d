"""Crash points for the chaos tests: the operator SIGKILLs itself at a named moment, once.

A crash between two writes is where an operator breaks: a child created but the next one not, a
Model created but never marked Ready, a terminal status written but the trainer not stopped, a
NodePool released but the finalizer kept. Killing at random times rarely lands there; these do.

The tests arm a moment by creating the file `armed/<point>@<namespace>.<name>` under
`settings.crash_points_dir`. Reaching an armed point moves that file to `fired/` (an atomic
rename: it fires once, across restarts, and the test can count what landed) and kills the
process with SIGKILL, as a node failure or the OOM killer would. Unset, the default and always in
the chart, a point costs one attribute read."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from .settings import OperatorSettings

log = logging.getLogger(__name__)


def created(kind: str) -> str:
    """The point just after the operator created a child of this kind, before its next write."""
    return f"created-{kind}"


def status_written(phase: str) -> str:
    """The point just after the operator wrote this phase, before what follows it."""
    return f"status-{phase}"


# A NodePool released by the delete handler while the FineTuneJob's finalizer is still on.
RELEASED_NODE_POOL = "released-NodePool"


def reached(settings: OperatorSettings, point: str, namespace: str, name: str) -> None:
    if settings.crash_points_dir is None:
        return
    root = Path(settings.crash_points_dir)
    armed = root / "armed" / f"{point}@{namespace}.{name}"
    try:
        armed.rename(root / "fired" / armed.name)
    except FileNotFoundError:
        return
    log.warning("crash point %s reached for %s/%s: killing the operator", point, namespace, name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
