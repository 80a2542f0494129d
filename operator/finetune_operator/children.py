"""Pure builders for the objects that run a FineTuneJob's trainer: a ConfigMap holding the trainer
config, a batch/v1 Job (Indexed, one pod per node) and, for several nodes, a headless Service that
gives rank 0 a stable DNS name for torchrun's rendezvous."""

from __future__ import annotations

import finetune_trainer.cli as trainer_cli  # torch-free at import: only its module name is used
import yaml

from . import checkpoint_key, failures, naming, provisioning, sources, trainer_config
from .api import FineTuneJob, TrainerPodSpec
from .naming import TRAINER_CONTAINER
from .progress import AUDIENCE as PROGRESS_AUDIENCE
from .settings import OperatorSettings

RENDEZVOUS_PORT = 29500


def build_config_map(job: FineTuneJob, settings: OperatorSettings, checkpoint_key_sha256: str | None = None) -> dict:
    """`checkpoint_key_sha256`: the digest of the key in the job's checkpoint-key Secret
    (checkpoint_key.py); the trainer refuses a key file with another digest."""
    config = trainer_config.render(job, progress_url=settings.progress_url, checkpoint_key_sha256=checkpoint_key_sha256,
                                   model_cache=bool(settings.model_cache_claim))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": naming.config_map_name(job),
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job),
            "ownerReferences": [naming.owner_reference(job)],
        },
        "data": {trainer_config.CONFIG_FILE: yaml.safe_dump(config, sort_keys=False)},
    }


def build_service(job: FineTuneJob) -> dict:
    """Headless Service: pods of the Indexed Job get DNS names <job>-trainer-<index>.<service>."""
    name = naming.trainer_name(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job),
            "ownerReferences": [naming.owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before anything is Ready
            "selector": {naming.JOB_LABEL: job.metadata.name, naming.COMPONENT_LABEL: "trainer"},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def build_network_policy(job: FineTuneJob) -> dict:
    """Who may reach a job's trainer pods: the job's own pods, on any port (torchrun's
    rendezvous, NCCL's and the process group's sockets use ports chosen at run time), and anyone
    on the metrics port (Prometheus lives in some other namespace). Enforced where the cluster's
    network plugin implements NetworkPolicy; pods in the node's network are outside its reach."""
    own_pods = {naming.JOB_LABEL: job.metadata.name, naming.COMPONENT_LABEL: "trainer"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": naming.trainer_name(job),
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job),
            "ownerReferences": [naming.owner_reference(job)],
        },
        "spec": {
            "podSelector": {"matchLabels": own_pods},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": own_pods}}]},
                {"ports": [{"port": trainer_config.METRICS_PORT, "protocol": "TCP"}]},
            ],
        },
    }


def needs_service(job: FineTuneJob) -> bool:
    return job.spec.distributed.nodes > 1


def trainer_command(job: FineTuneJob) -> list[str]:
    config = f"{trainer_config.CONFIG_DIR}/{trainer_config.CONFIG_FILE}"
    nodes, per_node = job.spec.distributed.nodes, job.spec.processes_per_node
    if nodes == 1 and per_node == 1:
        return ["finetune-trainer", "--config", config]
    name = naming.trainer_name(job)
    command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={per_node}"]
    if nodes > 1:
        command += [
            "--node-rank=$(NODE_RANK)",
            f"--master-addr={name}-0.{name}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    else:
        command += ["--standalone"]
    return command + ["-m", trainer_cli.__name__, "--config", config]


def _resources(job: FineTuneJob, scratch: str | None = None) -> dict:
    res = job.spec.resources
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.accelerator != "none":
        requests[res.accelerator] = str(res.accelerators_per_node)
        limits[res.accelerator] = str(res.accelerators_per_node)
    if scratch:
        requests["ephemeral-storage"] = scratch
    return {"requests": requests, "limits": limits}


def _hub_download_space(job: FineTuneJob, settings: OperatorSettings) -> tuple[dict | None, str | None]:
    """Where an hf:// base model goes: the shared cache claim (mount, none), or the pod's own
    scratch directory with the configured size (none, the ephemeral-storage request)."""
    if not trainer_config.uses_hub(job):
        return None, None
    if settings.model_cache_claim:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": settings.model_cache_claim}}, None
    return None, settings.hub_scratch_size


def trainer_pod_settings(job: FineTuneJob, settings: OperatorSettings) -> TrainerPodSpec:
    """The operator's trainer pod defaults with the job's own values on top: a set field wins,
    labels, annotations and env are merged by key (the job's win), pull secrets are both lists."""
    base, own = settings.trainer_pod, job.spec.trainer_pod
    env = {e.name: e for e in base.env or ()} | {e.name: e for e in own.env or ()}
    # Built without validation: each side passed it, and the union may hold more pull secrets
    # than one side may name.
    return TrainerPodSpec.model_construct(
        service_account_name=own.service_account_name or base.service_account_name,
        priority_class_name=own.priority_class_name or base.priority_class_name,
        image_pull_secrets=list(dict.fromkeys([*(base.image_pull_secrets or ()), *(own.image_pull_secrets or ())])),
        labels={**(base.labels or {}), **(own.labels or {})},
        annotations={**(base.annotations or {}), **(own.annotations or {})},
        env=list(env.values()),
    )


def build_job(job: FineTuneJob, settings: OperatorSettings) -> dict:
    spec = job.spec
    name = naming.trainer_name(job)
    resolved = trainer_config.resolved_sources(job)
    mounts = sources.merge_mounts(*resolved.values())
    volumes = [
        {"name": "config", "configMap": {"name": naming.config_map_name(job)}},
        {"name": "tmp", "emptyDir": {}},
        *sources.volumes_of(mounts),
    ]
    volume_mounts = [
        {"name": "config", "mountPath": trainer_config.CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        *[m.volume_mount() for m in mounts],
    ]
    cache_volume, scratch = _hub_download_space(job, settings)
    if cache_volume:
        # Read-write: the first job of a repository and revision downloads it for the others
        # (huggingface_hub locks each file in the cache while it writes it).
        volumes.append(cache_volume)
        volume_mounts.append({"name": cache_volume["name"], "mountPath": trainer_config.MODEL_CACHE_DIR})
    elif scratch:
        next(v for v in volumes if v["name"] == "tmp")["emptyDir"] = {"sizeLimit": scratch}
    if trainer_config.uses_base_model_token(job):
        # Only the `token` key, and only for a source that needs one (hf://): the trainer never
        # sees the rest of the Secret, and a Secret named for a pvc:// or preset:// source is not
        # mounted at all (a user who cannot read Secrets cannot have one copied out this way).
        volumes.append({
            "name": "base-model-credentials",
            "secret": {"secretName": spec.base_model.credentials_secret, "defaultMode": 0o400,
                       "items": [{"key": trainer_config.TOKEN_KEY, "path": trainer_config.TOKEN_KEY}]},
        })
        volume_mounts.append({"name": "base-model-credentials", "mountPath": trainer_config.TOKEN_DIR, "readOnly": True})
    # The job's checkpoint key (its one key, read-only, 0400): checkpoints are signed with it and
    # resumed only if they verify (checkpoint_key.py, finetune_trainer.checkpoint_integrity).
    volumes.append(checkpoint_key.volume(job))
    volume_mounts.append(checkpoint_key.volume_mount())
    if settings.progress_url:
        # A token the kubelet binds to this pod, for the operator's progress endpoint only: the
        # operator checks it with a TokenReview and accepts reports only from this job's pods.
        volumes.append({"name": "progress-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": PROGRESS_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}})
        volume_mounts.append({"name": "progress-token", "mountPath": trainer_config.PROGRESS_TOKEN_DIR, "readOnly": True})
    if spec.resources.accelerator != "none":
        # NCCL needs far more shared memory than a container's default 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        volume_mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{naming.COMPLETION_INDEX}']"}}},
        # Where the trainer binds its metrics endpoint (the config's metricsHost names it).
        {"name": trainer_config.POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if not spec.base_model.source.startswith("hf://"):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    pod_settings = trainer_pod_settings(job, settings)
    # The API refuses extra names the operator sets (api.RESERVED_ENV), so these never collide.
    env += [{"name": e.name, "value": e.value} for e in pod_settings.env]

    container = {
        "name": TRAINER_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.trainer_image_pull_policy,
        "command": trainer_command(job),
        "env": env,
        "ports": [{"name": "metrics", "containerPort": trainer_config.METRICS_PORT}],
        "resources": _resources(job, scratch),
        "volumeMounts": volume_mounts,
        "terminationMessagePath": trainer_config.TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    # The job's extra metadata first: the operator's own keys (selectors, the Job controller's)
    # are refused by the API for extra labels and annotations, and win here regardless.
    pod_labels = {**pod_settings.labels, **naming.labels(job)}
    placement = provisioning.pod_placement(job, settings)
    pod_annotations = {**pod_settings.annotations, **placement.pop("annotations", {})}
    security = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if settings.trainer_run_as_user is not None:
        uid = settings.trainer_run_as_user
        # Chown a volume only when its root is not the group's already, not every file of a
        # large claim on every start.
        security |= {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "fsGroupChangePolicy": "OnRootMismatch"}
    pod_spec = {
        "restartPolicy": "Never",
        # The trainer needs no Kubernetes API access, whichever ServiceAccount it runs as.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 120,  # time to write a checkpoint on SIGTERM
        "securityContext": security,
        "containers": [container],
        "volumes": volumes,
        **placement,
    }
    if pod_settings.service_account_name:
        pod_spec["serviceAccountName"] = pod_settings.service_account_name
    if pod_settings.priority_class_name:
        pod_spec["priorityClassName"] = pod_settings.priority_class_name
    if pod_settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in pod_settings.image_pull_secrets]
    if settings.trainer_host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if needs_service(job):
        pod_spec["subdomain"] = name
    job_spec = {
        "suspend": spec.suspend,
        "completionMode": "Indexed",
        "completions": spec.distributed.nodes,
        "parallelism": spec.distributed.nodes,
        # backoffLimit counts failed pods; a multi-node attempt that fails ends all its pods.
        "backoffLimit": spec.backoff_limit * spec.distributed.nodes,
        # What the Job controller does about a failed pod, from the one table of failure rules:
        # fail at once on bad config or data, ignore disruptions (failures.RULES).
        "podFailurePolicy": failures.pod_failure_policy(TRAINER_CONTAINER),
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": naming.labels(job),
            "ownerReferences": [naming.owner_reference(job)],
        },
        "spec": job_spec,
    }
