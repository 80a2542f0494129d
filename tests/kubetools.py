"""Helpers for tests against the local control plane: kubectl, polling, the operator process."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FTO_CACHE", Path.home() / ".cache" / "finetune-operator"))
KUBECTL = str(CACHE / "bin" / "kubectl")
VENV_BIN = Path(sys.executable).parent
# The local cluster's DNS (CoreDNS, started by hack/cluster.sh on DNS_IP:53).
CLUSTER_DNS = os.environ.get("DNS_IP", "127.0.0.10")


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll until predicate returns something truthy; return it, or fail with `what`.

    Errors on the way (a kubectl call that failed, a status not written yet) are polled through;
    an AssertionError is a predicate saying the outcome is already wrong, and fails at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling through transient errors
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


class KubectlError(RuntimeError):
    """A kubectl command failed: transient while the cluster settles, so wait_for polls through it."""


class Kubectl:
    def __init__(self, kubeconfig: str, namespace: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [KUBECTL, "--kubeconfig", self.kubeconfig]
        if self.namespace:
            cmd += ["--namespace", self.namespace]
        proc = subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str) -> dict | None:
        proc = self("get", kind, name, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise KubectlError(proc.stderr)
        return json.loads(proc.stdout)

    def items(self, kind: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind] + (["-l", selector] if selector else [])
        return self.json(*args)["items"]

    def apply(self, manifest: dict | str, *, dry_run: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        args = ["apply", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
        return self(*args, input=text, check=check)

    def create(self, manifest: dict) -> dict:
        return json.loads(self("create", "-f", "-", "-o", "json", input=yaml.safe_dump(manifest)).stdout)

    def merge_patch(self, kind: str, name: str, patch: dict, *, subresource: str | None = None,
                    check: bool = True) -> subprocess.CompletedProcess:
        args = ["patch", kind, name, "--type=merge", "-p", json.dumps(patch)]
        if subresource:
            args += ["--subresource", subresource]
        return self(*args, check=check)


def dns_a(name: str, server: str = CLUSTER_DNS, timeout: float = 2.0) -> tuple[int, list[str]]:
    """One A query over UDP: (rcode, addresses). Straight to `server`, bypassing this machine's
    resolver, so it asks the cluster DNS and nothing else."""
    query_id = uuid.uuid4().int & 0xFFFF
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        reply = s.recv(4096)
    rcode, answers = reply[3] & 0x0F, int.from_bytes(reply[6:8], "big")
    pos = 12 + len(question) + 4
    addresses = []
    for _ in range(answers):
        while reply[pos] and reply[pos] & 0xC0 != 0xC0:   # the owner name: labels, or a pointer
            pos += reply[pos] + 1
        pos += 2 if reply[pos] & 0xC0 == 0xC0 else 1
        rtype, length = int.from_bytes(reply[pos:pos + 2], "big"), int.from_bytes(reply[pos + 8:pos + 10], "big")
        if rtype == 1 and length == 4:
            addresses.append(".".join(str(b) for b in reply[pos + 10:pos + 14]))
        pos += 10 + length
    return rcode, addresses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """The real operator (`finetune-operator`) as a child process watching one namespace."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, identity: str = "test-operator",
                 env: dict[str, str] | None = None, max_open_files: int | None = None) -> None:
        self.kubeconfig, self.namespace, self.log_path, self.identity = kubeconfig, namespace, log_path, identity
        self.extra_env = env or {}
        self.max_open_files = max_open_files  # e.g. 1024, a container runtime's usual default
        self.progress_port = free_port()
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "OperatorProcess":
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "FINETUNE_NAMESPACES": self.namespace,
            "FINETUNE_LEASE_NAMESPACE": self.namespace,
            # A restarted container keeps its pod name, so it keeps its leader-election identity
            # and takes its own Lease back at once instead of waiting for it to expire.
            "FINETUNE_IDENTITY": self.identity,
            "FINETUNE_METRICS_PORT": str(self.metrics_port),
            "FINETUNE_HEALTH_PORT": str(self.health_port),
            "FINETUNE_RESYNC_SECONDS": "3",
            "FINETUNE_PROGRESS_PORT": str(self.progress_port),
            "FINETUNE_PROGRESS_URL": f"http://127.0.0.1:{self.progress_port}",
            "FINETUNE_PROGRESS_INTERVAL_SECONDS": "2",
            "FINETUNE_TRAINER_IMAGE": "finetune-trainer:test",
            **self.extra_env,
        }
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"\n===== start {self.starts} =====\n")
        log.flush()
        limit = self.max_open_files
        self.proc = subprocess.Popen([str(VENV_BIN / "finetune-operator")], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
                                     if limit else None)
        log.close()
        return self

    def wait_leading(self, timeout: float = 60) -> None:
        marker = f"===== start {self.starts} ====="
        wait_for(lambda: f"became leader as {self.identity}" in self.log_path.read_text().rsplit(marker, 1)[-1],
                 timeout, what=f"operator {self.identity} to lead")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    @property
    def log(self) -> str:
        return self.log_path.read_text()


class CrashPoints:
    """The operator's crash points (finetune_operator/crashpoints.py) for one test: arm a moment
    of one job's lifecycle; the operator SIGKILLs itself there once. `fired` is what landed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("armed", "fired"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.env = {"FINETUNE_CRASH_POINTS_DIR": str(root)}

    def arm(self, point: str, namespace: str, name: str) -> None:
        (self.root / "armed" / f"{point}@{namespace}.{name}").touch()

    def _names(self, sub: str) -> set[tuple[str, str]]:
        return {tuple(p.name.split("@", 1)) for p in (self.root / sub).iterdir()}  # type: ignore[misc]

    @property
    def armed(self) -> set[tuple[str, str]]:
        return self._names("armed")

    @property
    def fired(self) -> set[tuple[str, str]]:
        return self._names("fired")


class Supervisor(threading.Thread):
    """Starts the operator again whenever it exits, as the kubelet restarts a crashed container."""

    def __init__(self, operator: OperatorProcess) -> None:
        super().__init__(daemon=True)
        self.operator, self.restarts = operator, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            if self.operator.proc is not None and self.operator.proc.poll() is not None:
                self.restarts += 1
                self.operator.start()

    def stop(self) -> None:
        self.halt.set()
        self.join()


class ProcessNode:
    """`python -m process_node` (hack/process_node) for one test: a node whose pods really run,
    as local processes, logging under the test's directory."""

    def __init__(self, kubeconfig: str, root: Path, prefix: str, args: list[str] | None = None,
                 taint_key: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.env = env or {}   # more environment for the node, which its containers inherit
        self.taint_key = taint_key
        self.kubeconfig = kubeconfig
        self.state_dir = root / "state"
        self.log_path = root / "process-node.log"
        self.args = [*(args or []), *(["--taint", f"{taint_key}=true:NoSchedule"] if taint_key else [])]
        self.kubectl = Kubectl(kubeconfig)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ProcessNode":
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO / "hack")}
        env.pop("KUBECONFIG", None)  # the node uses --kubeconfig, nothing else
        cmd = [sys.executable, "-m", "process_node", "--kubeconfig", self.kubeconfig, "--node-name", self.name,
               "--state-dir", str(self.state_dir), "--log-file", str(self.log_path), *self.args]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_for(self._ready, 30, what=f"process node {self.name} Ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"process node exited {self.proc.returncode}: {self.proc.stderr.read().decode()}; "
                                 f"log: {self.log_path}")
        node = self.kubectl.get("node", self.name) or {}
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (containers die through their parent-death signal)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    @property
    def placement(self) -> dict:
        """nodeSelector (and toleration, when tainted) that put a pod on this node."""
        placement: dict = {"nodeSelector": {"kubernetes.io/hostname": self.name}}
        if self.taint_key:
            placement["tolerations"] = [{"key": self.taint_key, "operator": "Exists", "effect": "NoSchedule"}]
        return placement

    def delete(self) -> None:
        self.kubectl("delete", "node", self.name, "--ignore-not-found", "--wait=false", check=False)

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def container_log(self, namespace: str, pod_prefix: str) -> str:
        logs = sorted((self.state_dir / "logs").glob(f"{namespace}_{pod_prefix}*/*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)
