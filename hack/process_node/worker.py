"""One pod's lifecycle on this node: admit, prepare, run, report, and delete when asked."""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from process_node import devices as devices_, dns, envvars, podstatus, volumes
from process_node.config import Config
from process_node.kube import Conflict, Kube, NotFound, pod_path
from process_node.runtime import LaunchSpec, Mount, Process

Obj = dict[str, Any]
log = logging.getLogger(__name__)
RETRY_SECONDS = 2.0
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_BACKOFF_SECONDS = 300.0   # kubelet: MaxContainerBackOff
RESTART_POLICIES = ("Never", "OnFailure", "Always")


def service_env(server: str) -> dict[str, str]:
    """The `kubernetes` Service variables the kubelet gives every container, pointing straight at
    the API server this node uses (Services are not proxied here): in-cluster clients (kr8s,
    Kopf, client-go) find the server through them."""
    url = urlsplit(server)
    if not url.hostname:
        return {}
    host, port = url.hostname, str(url.port or 443)
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host}


def restarts(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


class Unsupported(Exception):
    """The pod can never run on a process node; it fails at admission."""


def admit(pod: Obj) -> Obj:
    """The single container to run, or Unsupported with a message a user can act on."""
    spec = pod.get("spec") or {}
    if spec.get("initContainers"):
        raise Unsupported("init containers are not supported by the process node")
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise Unsupported(f"the process node runs single-container pods; this pod has {len(containers)}")
    if spec.get("restartPolicy", "Always") not in RESTART_POLICIES:
        raise Unsupported(f"unknown restartPolicy {spec.get('restartPolicy')!r}")
    if not containers[0].get("command"):
        raise Unsupported("the container has no command: with no image, a process node runs only explicit commands")
    return containers[0]


def host_ports(pod: Obj) -> set[tuple[str, str, int]]:
    """(protocol, hostIP, hostPort) of the pod's ports that claim a port of the node: those with a
    hostPort, which the API server sets to the containerPort for every port of a hostNetwork pod."""
    return {(p.get("protocol") or "TCP", p.get("hostIP") or "0.0.0.0", int(p["hostPort"]))
            for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or [] if p.get("hostPort")}


def port_conflict(pod: Obj, others: Iterable[Obj]) -> str | None:
    """The kubelet's NodePorts admission check (the scheduler's, for pods bound by nodeName): a
    host port already taken by a pod running here, on the same protocol and an overlapping hostIP."""
    wanted = host_ports(pod)
    if not wanted:
        return None
    taken = set().union(*(host_ports(o) for o in others))
    for proto, ip, port in wanted:
        if any(p == proto and n == port and (i == ip or "0.0.0.0" in (i, ip)) for p, i, n in taken):
            return ("Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested "
                    f"pod ports ({proto} {ip}:{port} is taken)")
    return None


class PodWorker:
    def __init__(self, pod: Obj, kube: Kube, config: Config, base_env: dict[str, str],
                 peers: Callable[[], Iterable[Obj]] = tuple, devices: devices_.Devices | None = None) -> None:
        self.pod = pod
        self.peers = peers            # the pods admitted on this node and not finished
        self.devices = devices if devices is not None else devices_.Devices()   # shared by the node's pods
        self.device_env: dict[str, str] = {}
        self.admitted = False
        self.uid: str = pod["metadata"]["uid"]
        self.kube, self.config, self.base_env = kube, config, base_env
        self._changed = asyncio.Event()
        self._process: Process | None = None
        self._shutdown = False
        self._finished = asyncio.Event()   # the container's end has been reported (or never started)
        self.task: asyncio.Task | None = None
        self._tokens: list[tuple[Any, list[Obj], int]] = []   # (dir, sources, mode) of projected volumes

    # ---- inputs from the watch -----------------------------------------------------------
    def update(self, pod: Obj) -> None:
        self.pod = pod
        self._changed.set()

    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    @property
    def pod_dir(self):
        return self.config.pods_dir / self.uid

    # ---- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._start_or_recover()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one pod's bug must not take the node down
            log.exception("pod %s: worker failed; the pod is left to deletion", self.name)
        self._finished.set()
        self.devices.release(self.uid)
        try:
            await self._wait_deletion()
            await self._delete()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("pod %s: deletion failed", self.name)

    async def _start_or_recover(self) -> None:
        phase = (self.pod.get("status") or {}).get("phase", "Pending")
        if phase == "Running":  # started by an earlier run of this node: the process died with it
            await self._report_lost()
        elif phase == "Pending" and not self.deleting:
            await self._run_pod()

    async def _report_lost(self) -> None:
        container = (self.pod["spec"].get("containers") or [{"name": "unknown"}])[0]
        previous = ((self.pod["status"].get("containerStatuses") or [{}])[0])
        started = (previous.get("state") or {}).get("running", {}).get("startedAt") or podstatus.now()
        result = podstatus.Terminated(137, "ContainerStatusUnknown",
                                      "the process node restarted and lost this container", started, podstatus.now())
        await self._report(podstatus.terminated(self.pod, container, self.config.node_ip, result,
                                                previous.get("containerID", "")))

    async def _run_pod(self) -> None:
        try:
            container = admit(self.pod)
        except Unsupported as exc:
            log.info("pod %s rejected: %s", self.name, exc)
            await self._report(podstatus.rejected(self.pod, self.config.node_ip, "UnsupportedByProcessNode", str(exc)))
            return
        conflict = port_conflict(self.pod, self.peers())
        if conflict:
            log.info("pod %s rejected: %s", self.name, conflict)
            await self._report(podstatus.rejected(self.pod, self.config.node_ip, "NodePorts", conflict))
            return
        try:
            self.device_env = self.devices.allocate(self.uid, container)
        except devices_.DeviceError as exc:
            log.info("pod %s rejected: %s", self.name, exc)
            await self._report(podstatus.rejected(self.pod, self.config.node_ip, "UnexpectedAdmissionError", str(exc)))
            return
        self.admitted = True   # no await since the checks: two pods never share a port or a device
        spec = await self._prepare(container)
        if spec is None:
            return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        refresher = asyncio.ensure_future(self._refresh_tokens())
        restart_count, last_state = 0, None
        try:
            while True:
                process = self._process = Process(spec)
                await process.start()
                await self._report(podstatus.running(self.pod, container, self.config.node_ip, process.started_at,
                                                     process.container_id, restart_count, last_state))
                result = await self._wait_process(process)
                log.info("pod %s: container exited %d (%s)", self.name, result.exit_code, result.reason)
                if self.deleting or self._shutdown or not restarts(policy, result.exit_code):
                    break
                # restartPolicy Always/OnFailure: back off, then run the container again, in the same pod
                delay = min(self.config.restart_backoff_seconds * 2 ** restart_count, MAX_BACKOFF_SECONDS)
                restart_count += 1
                last_state = {"terminated": result.to_wire(process.container_id)}
                await self._report(podstatus.back_off(self.pod, container, self.config.node_ip, result,
                                                      process.container_id, restart_count, delay))
                if not await self._sleep_unless_deleted(delay):
                    break
        finally:
            refresher.cancel()
        status = podstatus.terminated(self.pod, container, self.config.node_ip, result, process.container_id,
                                      restart_count)
        if self._shutdown:
            status |= {"phase": "Failed", "reason": "Terminated",
                       "message": "Pod was terminated in response to imminent node shutdown."}
        await self._report(status)

    async def _wait_process(self, process: Process) -> podstatus.Terminated:
        """The container's end: its own exit, or the pod's deletion (SIGTERM, grace, SIGKILL)."""
        waiter = asyncio.ensure_future(process.wait())
        while not waiter.done() and not self.deleting and not self._shutdown:
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        if not waiter.done():
            await process.terminate(self.grace_seconds())
        return await waiter

    async def _sleep_unless_deleted(self, seconds: float) -> bool:
        """Sleep; False if the pod is being deleted (or the node stops) meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.deleting and not self._shutdown:
            left = deadline - loop.time()
            if left <= 0:
                return True
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return False

    async def _refresh_tokens(self) -> None:
        """Rewrite projected service-account tokens at 80% of their lifetime, as the kubelet does."""
        shortest = min((seconds for _, _, seconds in self._tokens), default=None)
        if shortest is None:
            return
        while True:
            await asyncio.sleep(shortest * 0.8)
            for root, sources, mode in self._tokens:
                try:
                    await volumes.write_tokens(root, sources, self._token, mode)
                except Exception as exc:  # noqa: BLE001 - keep the old token and try again next round
                    log.warning("pod %s: token refresh failed: %s", self.name, exc)

    async def _prepare(self, container: Obj) -> LaunchSpec | None:
        """Volumes and env, retried while their sources are missing (kubelet: CreateContainerConfigError).
        None: the pod was rejected, deleted, or the node is stopping."""
        last = ""
        while not self.deleting:
            try:
                return await self._launch_spec(container)
            except (volumes.VolumeError, envvars.EnvError) as exc:
                if str(exc) != last:
                    last = str(exc)
                    log.info("pod %s: waiting: %s", self.name, exc)
                    await self._report(podstatus.waiting(self.pod, container, self.config.node_ip,
                                                         "CreateContainerConfigError", last))
            except ValueError as exc:
                await self._report(podstatus.rejected(self.pod, self.config.node_ip, "UnsupportedByProcessNode", str(exc)))
                return None
            if not await self._sleep_unless_deleted(RETRY_SECONDS):
                return None  # deleted, or the node is stopping: nothing to start
        return None

    async def _launch_spec(self, container: Obj) -> LaunchSpec:
        meta = self.pod["metadata"]
        namespace = meta["namespace"]
        pod_volumes = self.pod["spec"].get("volumes") or []
        paths = await volumes.materialise(
            pod_volumes, self.pod_dir / "volumes", self._fetch,
            lambda claim: volumes.claim_host_dir(self.config, self._get_or_none, namespace, claim),
            token=self._token, pod=self.pod, node_ip=self.config.node_ip)
        self._tokens = []
        for v in pod_volumes:
            sources = (v.get("projected") or {}).get("sources") or []
            token_sources = [src for src in sources if "serviceAccountToken" in src]
            if token_sources:
                seconds = min(int(src["serviceAccountToken"].get("expirationSeconds") or volumes.DEFAULT_TOKEN_SECONDS)
                              for src in token_sources)
                self._tokens.append((paths[v["name"]], token_sources, seconds))
        mounts = []
        for m in container.get("volumeMounts") or []:
            if m["name"] not in paths:
                raise ValueError(f"volumeMount {m['name']!r}: no such volume")
            source = paths[m["name"]]
            if m.get("subPath"):
                # Created when missing, as the kubelet does, and confined to the volume (symlinks too).
                source = volumes.sub_path(source, m["subPath"])
            mounts.append(Mount(source, m["mountPath"], bool(m.get("readOnly"))))
        names = dns.pod_names(self.pod, self.config.node_ip, list(self.config.cluster_dns), self.config.cluster_domain)
        # The kubelet's managed files, unless the container mounts its own there.
        for target, text in (("/etc/resolv.conf", names.resolv_conf), ("/etc/hosts", names.hosts)):
            if any(m.target.rstrip("/") == target for m in mounts):
                continue
            path = self.pod_dir / "etc" / target.rsplit("/", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o644)
            mounts.append(Mount(path, target))
        env_vars = await envvars.resolve(self.pod, container, self._fetch, self.config.node_ip)
        # The devices' variables come last: a container cannot widen its share of the node's GPUs.
        env = {**self.base_env, "HOSTNAME": names.env_hostname, **service_env(self.kube.server), **env_vars,
               **self.device_env}
        name = container["name"]
        policy = container.get("terminationMessagePolicy", "File")
        return LaunchSpec(
            command=envvars.command_line(container, env_vars), env=env,
            working_dir=container.get("workingDir") or "/", mounts=mounts,
            container_dir=self.pod_dir / "containers" / name, scratch_dir=self.pod_dir / "containers" / name / "ns",
            log_path=self.config.logs_dir / f"{namespace}_{meta['name']}_{self.uid}" / f"{name}.log",
            termination_message_path=container.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH),
            fallback_to_logs=policy == "FallbackToLogsOnError", hostname=names.hostname)

    def grace_seconds(self) -> float:
        meta, spec = self.pod["metadata"], self.pod.get("spec") or {}
        grace = meta.get("deletionGracePeriodSeconds")
        return float(grace if grace is not None else spec.get("terminationGracePeriodSeconds", 30))

    async def _wait_deletion(self) -> None:
        while not self.deleting:
            self._changed.clear()
            await self._changed.wait()

    async def _delete(self) -> None:
        """The container is gone: remove the pod object for good (kubelet: grace period 0)."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                   "preconditions": {"uid": self.uid}}
        try:
            await self.kube.delete(pod_path(self.pod["metadata"]["namespace"], self.pod["metadata"]["name"]), options)
            log.info("pod %s deleted", self.name)
        except (NotFound, Conflict):
            pass
        self.cleanup()

    async def stop(self, grace_seconds: float) -> None:
        """Node shutdown: end the container, report it (kubelet: graceful node shutdown), stop."""
        self._shutdown = True
        self._changed.set()
        if self._process is not None:
            await self._process.terminate(grace_seconds)
            try:
                await asyncio.wait_for(self._finished.wait(), 5)
            except asyncio.TimeoutError:
                pass
        if self.task is not None:
            self.task.cancel()

    def cleanup(self) -> None:
        """Drop the pod's volumes and runtime state; its logs stay under logs/."""
        shutil.rmtree(self.pod_dir, ignore_errors=True)

    # ---- API helpers ---------------------------------------------------------------------
    async def _report(self, status: Obj) -> None:
        meta = self.pod["metadata"]
        try:
            await self.kube.merge_patch(pod_path(meta["namespace"], meta["name"], "status"), podstatus.patch(self.pod, status))
        except (NotFound, Conflict) as exc:
            log.info("pod %s: status not written (%s)", self.name, exc)

    async def _get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.kube.get(path)
        except NotFound:
            return None

    async def _token(self, audience: str | None, seconds: int) -> str:
        """A token for the pod's ServiceAccount, bound to this pod (TokenRequest API), as the
        kubelet gets one for a projected serviceAccountToken source."""
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience] if audience else [], "expirationSeconds": seconds,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": self.uid}}}
        try:
            response = await self.kube.create(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", body)
        except NotFound as exc:
            raise volumes.VolumeError(f'ServiceAccount "{account}" not found') from exc
        return response["status"]["token"]

    async def _fetch(self, kind: str, name: str) -> Obj | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        return await self._get_or_none(f"/api/v1/namespaces/{self.pod['metadata']['namespace']}/{plural}/{name}")
