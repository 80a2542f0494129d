"""One container as a local process: spawn it through sandbox.py, wait, signal its group."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from process_node.podstatus import Terminated, now

SANDBOX = Path(__file__).with_name("sandbox.py")
# What a container runs is this node's own Python environment (there is no image): the venv, the
# interpreter it was made from, and the repository its editable install points into. A volume
# mounted over one of their ancestors (an emptyDir on /tmp while the checkout is under /tmp)
# would hide them, so the sandbox binds them back on top.
RUNTIME_PATHS = sorted({sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2])})
MAX_MESSAGE = 4096          # kubelet: MaxContainerTerminationMessageLength
FALLBACK_LOG_LINES = 80     # kubelet: MaxContainerTerminationMessageLogLines
FALLBACK_LOG_BYTES = 2048   # kubelet: MaxContainerTerminationMessageLogLength
START_ERROR_EXIT = 128

log = logging.getLogger(__name__)
_live_groups: set[int] = set()


@atexit.register
def _kill_all() -> None:
    """Last resort: no container outlives the node program."""
    for pgid in list(_live_groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    command: list[str]
    env: dict[str, str]
    working_dir: str
    mounts: list[Mount]
    container_dir: Path      # per-container state: spec, termination message, start error
    scratch_dir: Path        # mount point of the namespace's private tmpfs
    log_path: Path
    termination_message_path: str | None
    fallback_to_logs: bool
    hostname: str | None = None   # the UTS namespace's hostname; None: the host's (hostNetwork)


class Process:
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self._proc: asyncio.subprocess.Process | None = None
        self.started_at = ""
        self.killed_by_node = False

    @property
    def message_file(self) -> Path:
        return self.spec.container_dir / "termination-log"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def container_id(self) -> str:
        return f"process://{self._proc.pid}" if self._proc else ""

    async def start(self) -> None:
        spec = self.spec
        spec.container_dir.mkdir(parents=True, exist_ok=True)
        spec.scratch_dir.mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.message_file.write_bytes(b"")
        mounts = [{"source": str(m.source), "target": m.target, "readOnly": m.read_only} for m in spec.mounts]
        if spec.termination_message_path:
            mounts.append({"source": str(self.message_file), "target": spec.termination_message_path})
        launch = {"command": spec.command, "env": spec.env, "workingDir": spec.working_dir, "mounts": mounts,
                  "scratch": str(spec.scratch_dir), "startError": str(spec.container_dir / "start-error"),
                  "keepVisible": RUNTIME_PATHS, "hostname": spec.hostname}
        spec_file = spec.container_dir / "launch.json"
        spec_file.write_text(json.dumps(launch, indent=1))
        with open(spec.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SANDBOX), str(spec_file), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True, env={"PATH": os.environ.get("PATH", "")})
        self.started_at = now()
        _live_groups.add(self._proc.pid)
        log.info("started %s as pid %d: %s", spec.log_path.parent.name, self._proc.pid, spec.command)

    async def wait(self) -> Terminated:
        assert self._proc is not None
        code = await self._proc.wait()
        _live_groups.discard(self._proc.pid)
        self._reap_group()
        finished = now()
        start_error = self._read(self.spec.container_dir / "start-error", MAX_MESSAGE)
        if code == START_ERROR_EXIT and start_error:
            return Terminated(START_ERROR_EXIT, "StartError", start_error, self.started_at, finished)
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig else code
        return Terminated(exit_code, "Completed" if exit_code == 0 else "Error",
                          self._message(exit_code), self.started_at, finished, signal=sig)

    async def terminate(self, grace_seconds: float) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self.killed_by_node = True
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._proc.wait()), timeout=max(grace_seconds, 0))
        except asyncio.TimeoutError:
            log.info("pid %d outlived its %ss grace period: SIGKILL", self._proc.pid, grace_seconds)
            self._signal(signal.SIGKILL)
            await self._proc.wait()

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap_group(self) -> None:
        """The main process is gone: its group's stragglers go too, as a container's would."""
        self._signal(signal.SIGKILL)

    @staticmethod
    def _read(path: Path, limit: int) -> str:
        try:
            with open(path, "rb") as f:
                return f.read(limit).decode(errors="replace")
        except OSError:
            return ""

    def _message(self, exit_code: int) -> str:
        message = self._read(self.message_file, MAX_MESSAGE) if self.spec.termination_message_path else ""
        if not message and exit_code != 0 and self.spec.fallback_to_logs:
            message = tail(self.spec.log_path, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
        return message


def preflight(state_dir: Path) -> str | None:
    """Can this host give containers their mounts? None if so, else what is missing."""
    probe = state_dir / "preflight"
    probe.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(SANDBOX), "--check", str(probe)], capture_output=True, text=True,
                          timeout=30, env={"PATH": os.environ.get("PATH", "")})
    probe.rmdir()
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"sandbox check failed ({proc.returncode})")


def tail(path: Path, lines: int, limit: int) -> str:
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    text = b"\n".join(data.splitlines()[-lines:])[-limit:]
    return text.decode(errors="replace")
