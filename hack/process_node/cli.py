"""A minimal kubelet for one node: run pods bound to it as local processes. See docs/process-node.md."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from process_node import devices
from process_node.config import Config, Taint
from process_node.kube import Kube
from process_node.kubelet import Kubelet
from process_node.runtime import preflight

log = logging.getLogger("process_node")


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, int | None]:
    p = argparse.ArgumentParser(prog="python -m process_node", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config")
    p.add_argument("--node-name", default="local-0")
    p.add_argument("--state-dir", type=Path, default=Path(".process-node"),
                   help="pods' volumes, logs and runtime state (default: ./.process-node)")
    p.add_argument("--volumes-root", type=Path, help="host dir of PVCs not named by --volume (default: STATE/volumes)")
    p.add_argument("--volume", action="append", type=_pair, default=[], metavar="CLAIM=DIR",
                   help="run PVC CLAIM from host directory DIR (repeatable)")
    p.add_argument("--cpu", default="4")
    p.add_argument("--memory", default="16Gi")
    p.add_argument("--pods", default="10")
    p.add_argument("--resource", action="append", type=_pair, default=[], metavar="NAME=QTY",
                   help="extra capacity, e.g. nvidia.com/gpu=1 (repeatable)")
    p.add_argument("--device", action="append", type=devices.parse, default=[], metavar="NAME=ID[,ID...]",
                   help="devices this node owns and hands out one container at a time, e.g. nvidia.com/gpu=0,1; "
                        "the node advertises their count (repeatable)")
    p.add_argument("--label", action="append", type=_pair, default=[], metavar="KEY=VALUE")
    p.add_argument("--taint", action="append", type=Taint.parse, default=[], metavar="KEY[=VALUE]:EFFECT")
    p.add_argument("--node-ip", default="127.0.0.1", help="the node's and every pod's IP (must be loopback)")
    p.add_argument("--cluster-dns", default="", metavar="IP[,IP...]",
                   help="the cluster DNS (e.g. CoreDNS), as the kubelet's flag: the nameserver of pods with "
                        "dnsPolicy ClusterFirst[WithHostNet]; empty: they get the host's resolv.conf")
    p.add_argument("--cluster-domain", default="cluster.local",
                   help="the cluster's DNS domain, as the kubelet's flag (default: cluster.local)")
    p.add_argument("--heartbeat-seconds", type=float, default=10.0)
    p.add_argument("--shutdown-grace-seconds", type=float, default=10.0)
    p.add_argument("--restart-backoff-seconds", type=float, default=10.0,
                   help="first delay before restarting an exited container (restartPolicy Always/OnFailure); doubles up to 300")
    p.add_argument("--keep-node", action="store_true", help="leave the Node object behind on exit")
    p.add_argument("--exit-with-pid", type=int, metavar="PID",
                   help="stop (gracefully) when process PID is gone, e.g. the kube-apiserver's, so stopping "
                        "the control plane stops this node too")
    p.add_argument("--log-file", type=Path, help="default: STATE/process-node.log")
    p.add_argument("--verbose", "-v", action="store_true")
    a = p.parse_args(argv)
    if not a.node_ip.startswith("127."):
        p.error("--node-ip must be in 127.0.0.0/8: nothing may point outside loopback")
    cluster_dns = tuple(ip.strip() for ip in a.cluster_dns.split(",") if ip.strip())
    if any(not ip.startswith("127.") for ip in cluster_dns):
        p.error("--cluster-dns must be in 127.0.0.0/8: nothing may point outside loopback")
    config = Config(
        node_name=a.node_name, kubeconfig=a.kubeconfig, state_dir=a.state_dir.resolve(),
        volumes_root=a.volumes_root.resolve() if a.volumes_root else None,
        claim_dirs={k: Path(v).resolve() for k, v in a.volume},
        capacity={"cpu": a.cpu, "memory": a.memory, "pods": a.pods, **dict(a.resource),
                  **{name: str(len(ids)) for name, ids in a.device}},
        devices=dict(a.device),
        labels=dict(a.label), taints=tuple(a.taint), node_ip=a.node_ip,
        cluster_dns=cluster_dns, cluster_domain=a.cluster_domain.strip("."),
        heartbeat_seconds=a.heartbeat_seconds, shutdown_grace_seconds=a.shutdown_grace_seconds,
        restart_backoff_seconds=a.restart_backoff_seconds, keep_node=a.keep_node)
    log_file = a.log_file or config.state_dir / "process-node.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_file, level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "kr8s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return config, log_file, a.exit_with_pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _exit_with(pid: int, main: asyncio.Task) -> None:
    while _pid_alive(pid):
        await asyncio.sleep(1)
    log.info("process %d is gone: stopping", pid)
    main.cancel()


async def _serve(config: Config, exit_with_pid: int | None = None) -> None:
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, main.cancel)
    if exit_with_pid:
        watcher = asyncio.ensure_future(_exit_with(exit_with_pid, main))  # noqa: F841 - lives with the loop
    kubelet = Kubelet(await Kube.connect(config.kubeconfig), config)
    try:
        await kubelet.run()
    except asyncio.CancelledError:
        log.info("signalled: stopping")


def main(argv: list[str] | None = None) -> int:
    config, log_file, exit_with_pid = parse_args(argv)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    problem = preflight(config.state_dir)
    if problem:
        log.error("%s", problem)
        print(f"process node: {problem}", file=sys.stderr)
        return 1
    log.info("process node %s starting (state %s)", config.node_name, config.state_dir)
    try:
        asyncio.run(_serve(config, exit_with_pid))
    except SystemExit as exc:
        log.error("%s", exc)
        print(f"process node: {exc} (log: {log_file})", file=sys.stderr)
        return 1
    except Exception:
        log.exception("process node failed")
        print(f"process node failed; see {log_file}", file=sys.stderr)
        return 1
    log.info("process node %s stopped", config.node_name)
    return 0
