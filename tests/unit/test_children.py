import re

import pytest
import yaml
from factories import make_job

from finetune_operator import children, failures, naming
from finetune_operator.settings import OperatorSettings
from finetune_operator.sources import UnsupportedSource

SETTINGS = OperatorSettings(trainer_image="registry.local/trainer:1", default_provisioner="none")


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def test_config_map_carries_the_rendered_trainer_config():
    cm = children.build_config_map(make_job(), SETTINGS)
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert cm["metadata"]["name"] == "demo-trainer-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert config["dataset"]["path"] == "/mnt/pvc/data/sets/train.jsonl"
    assert config["output"]["dir"] == "/mnt/output"  # the destination's own directory, mounted by subPath
    assert config["jobUid"] == "uid-1"  # the owner of the output and its checkpoints
    assert config["dataset"]["volumeRoot"] == "/mnt/pvc/data"  # the dataset must resolve inside its mount
    assert config["baseModel"]["source"] == "preset://tiny-llama"
    assert config["reporting"]["terminationMessagePath"] == "/dev/termination-log"
    assert config["publish"]["sourceJob"] == {"name": "demo", "uid": "uid-1"}
    assert config["publish"]["uri"] == "pvc://models/demo"  # the user's URI, not the pod's path
    assert config["training"]["globalBatchSize"] == "auto"  # the trainer chooses it from the rows


def test_speed_settings_left_unset_reach_the_trainer_unset_and_explicit_ones_verbatim():
    from finetune_trainer.config import parse_config

    def rendered(**training):
        cm = children.build_config_map(make_job(training=training), SETTINGS)
        return parse_config(yaml.safe_load(cm["data"]["config.yaml"])).training

    unset = rendered()
    assert unset.gradient_checkpointing is None and unset.compile is None  # the trainer decides
    explicit = rendered(gradientCheckpointing=True, compile=False)
    assert explicit.gradient_checkpointing is True and explicit.compile is False


def test_single_process_job():
    job = children.build_job(make_job(resources={"accelerator": "none", "cpu": "2", "memory": "4Gi"}), SETTINGS)
    spec = job["spec"]
    assert job["metadata"]["name"] == "demo-trainer"
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (1, 1, "Indexed")
    assert spec["backoffLimit"] == 3
    c = container(job)
    assert c["command"] == ["finetune-trainer", "--config", "/etc/finetune/config.yaml"]
    assert c["image"] == "registry.local/trainer:1"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["terminationMessagePolicy"] == "File"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no chown of a whole claim per start
    assert "subdomain" not in pod
    assert "hostNetwork" not in pod


def test_host_network_is_a_setting_for_nodes_without_a_pod_network():
    settings = OperatorSettings(trainer_host_network=True)
    pod = children.build_job(make_job(), settings)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # Service names must still resolve through the cluster's DNS, not the node's.
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_gpu_job_requests_accelerators_and_shared_memory():
    job = children.build_job(make_job(resources={"acceleratorsPerNode": 4}, training={"globalBatchSize": 32}), SETTINGS)
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["command"][:3] == ["torchrun", "--nnodes=1", "--nproc-per-node=4"]
    assert "--standalone" in c["command"]
    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])


def test_multi_node_job_is_indexed_with_rendezvous_on_rank_zero():
    ftj = make_job(distributed={"nodes": 3}, resources={"acceleratorsPerNode": 8}, training={"globalBatchSize": 96, "microBatchSize": 4})
    job = children.build_job(ftj, SETTINGS)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3)
    assert job["spec"]["template"]["spec"]["subdomain"] == "demo-trainer"
    cmd = container(job)["command"]
    assert "--master-addr=demo-trainer-0.demo-trainer" in cmd and "--node-rank=$(NODE_RANK)" in cmd
    assert children.needs_service(ftj)
    svc = children.build_service(ftj)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True


def test_trainer_binds_metrics_on_its_pod_ip():
    job = children.build_job(make_job(), SETTINGS)
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    config = yaml.safe_load(children.build_config_map(make_job(), SETTINGS)["data"]["config.yaml"])
    assert config["reporting"]["metricsHost"] == "$(POD_IP)"
    assert container(job)["ports"] == [{"name": "metrics", "containerPort": 9090}]


def test_user_errors_fail_the_job_without_retries():
    policy = children.build_job(make_job(), SETTINGS)["spec"]["podFailurePolicy"]
    assert policy == failures.pod_failure_policy(children.TRAINER_CONTAINER)  # rendered from the one table
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}} in policy["rules"]
    # output.dir owned by another job (the trainer's owner file): also final at once.
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}} in policy["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in policy["rules"]


def test_inputs_are_read_only_and_only_the_destination_is_writable():
    """One volume per claim; inputs see the claim read-only, the output only its own directory
    (a subPath), so a trainer cannot write the rest of the claim: other jobs' outputs."""
    ftj = make_job(dataset={"source": "pvc://shared/data.jsonl"}, output={"destination": "pvc://shared/jobs//out/"},
                   baseModel={"source": "pvc://shared/base"})
    job = children.build_job(ftj, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    mounts = [m for m in container(job)["volumeMounts"] if m["name"] == "pvc-shared"]
    assert mounts == [{"name": "pvc-shared", "mountPath": "/mnt/pvc/shared", "readOnly": True},
                      {"name": "pvc-shared", "mountPath": "/mnt/output", "readOnly": False, "subPath": "jobs/out"}]
    assert [v for v in pod["volumes"] if v["name"] == "pvc-shared"] == [
        {"name": "pvc-shared", "persistentVolumeClaim": {"claimName": "shared"}}]
    writable = [m for m in container(job)["volumeMounts"] if not m.get("readOnly") and m["name"].startswith("pvc-")]
    assert writable == [mounts[1]]
    config = yaml.safe_load(children.build_config_map(ftj, SETTINGS)["data"]["config.yaml"])
    assert config["output"]["dir"] == "/mnt/output"
    assert config["baseModel"]["volumeRoot"] == config["dataset"]["volumeRoot"] == "/mnt/pvc/shared"


def test_output_alone_mounts_nothing_else_of_its_claim():
    job = children.build_job(make_job(), SETTINGS)
    mounts = [m for m in container(job)["volumeMounts"] if m["name"] == "pvc-models"]
    assert mounts == [{"name": "pvc-models", "mountPath": "/mnt/output", "readOnly": False, "subPath": "demo"}]


def test_secret_mounted_for_hub_token():
    job = children.build_job(make_job(baseModel={"source": "hf://org/model", "credentialsSecret": "hf-token"}), SETTINGS)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    # Only its token key: the rest of the Secret never reaches the trainer.
    assert volumes["base-model-credentials"]["secret"] == {
        "secretName": "hf-token", "defaultMode": 0o400, "items": [{"key": "token", "path": "token"}]}
    config = yaml.safe_load(children.build_config_map(make_job(
        baseModel={"source": "hf://org/model", "credentialsSecret": "hf-token"}), SETTINGS)["data"]["config.yaml"])
    assert config["baseModel"]["tokenFile"] == "/var/run/secrets/finetune/base-model/token"
    env = {e["name"] for e in container(job)["env"]}
    assert "HF_HUB_OFFLINE" not in env
    assert not any("token" in str(e.get("value", "")) for e in container(job)["env"])  # never in env


@pytest.mark.parametrize("spec", [
    {"baseModel": {"source": "pvc://models/base", "credentialsSecret": "any-secret"}},
    {"baseModel": {"source": "preset://tiny-llama", "credentialsSecret": "any-secret"}},
    {"dataset": {"source": "pvc://data/train.jsonl", "credentialsSecret": "any-secret"}},
    {"output": {"destination": "pvc://models/demo", "credentialsSecret": "any-secret"}},
])
def test_credentials_are_mounted_only_for_sources_that_use_them(spec):
    """A Secret named for a source that reads no credentials is not mounted: the trainer (and
    its outputs) never see a Secret its user could not read."""
    ftj = make_job(**spec)
    pod = children.build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    # The one Secret mounted is the job's own checkpoint key (checkpoint_key.py).
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == ["demo-checkpoint-key"]
    assert "any-secret" not in str(pod)
    config = yaml.safe_load(children.build_config_map(ftj, SETTINGS)["data"]["config.yaml"])
    assert "tokenFile" not in config["baseModel"]


def test_existing_provisioner_places_by_selector_and_tolerations():
    ftj = make_job(nodePool={"provisioner": "existing", "nodeSelector": {"pool": "gpu"},
                             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    pod = children.build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_deadline_maps_to_the_job():
    assert children.build_job(make_job(activeDeadlineSeconds=600), SETTINGS)["spec"]["activeDeadlineSeconds"] == 600


def test_a_configmap_without_a_key_is_refused_before_anything_is_built():
    with pytest.raises(UnsupportedSource, match="configmap:// needs NAME/KEY"):
        children.build_config_map(make_job(dataset={"source": "configmap://only-name"}), SETTINGS)


@pytest.mark.parametrize("field,value,allowed", [
    ("dataset", {"source": "s3://bucket/x.jsonl"}, "pvc:// or configmap://"),
    ("dataset", {"source": "hf://org/data"}, "pvc:// or configmap://"),
    ("dataset", {"source": "https://example.com/x.jsonl"}, "pvc:// or configmap://"),
    ("output", {"destination": "oci://reg/repo:tag"}, "pvc://"),
    ("output", {"destination": "s3://bucket/out"}, "pvc://"),
    ("baseModel", {"source": "s3://bucket/model"}, "hf:// or pvc:// or preset://"),
])
def test_schemes_without_a_transport_are_refused_when_the_spec_is_parsed(field, value, allowed):
    """The same rule the CRD applies at `kubectl apply` (tests/spec_cases.py runs it there)."""
    with pytest.raises(ValueError, match=f"must be a {allowed} URI without spaces .*not supported"):
        make_job(**{field: value})


def test_progress_channel_is_a_pod_bound_token_for_the_operator():
    settings = OperatorSettings(progress_url="http://finetune-operator.system.svc:8082/")
    ftj = make_job()
    config = yaml.safe_load(children.build_config_map(ftj, settings)["data"]["config.yaml"])
    assert config["reporting"]["progressUrl"] == \
        "http://finetune-operator.system.svc:8082/v1/namespaces/team-a/finetunejobs/demo/progress"
    assert config["reporting"]["progressTokenFile"] == "/var/run/secrets/finetune/progress/token"
    pod = children.build_job(ftj, settings)["spec"]["template"]["spec"]
    (projected,) = [v for v in pod["volumes"] if v["name"] == "progress-token"]
    assert projected["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "finetune.ai/progress"
    assert pod["automountServiceAccountToken"] is False  # no API token, only the progress one
    no_progress = yaml.safe_load(children.build_config_map(ftj, SETTINGS)["data"]["config.yaml"])
    assert "progressUrl" not in no_progress["reporting"]


def test_every_source_gets_a_volume_name_the_api_server_accepts() -> None:
    """Claim and ConfigMap names are DNS subdomains (dots, 253 characters); a volume's is a DNS
    label. A dotted or long name gets a readable stem and a digest, and two never collide."""
    from finetune_operator.sources import volume_name

    label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    assert volume_name("pvc", "data") == "pvc-data"
    names = ["data.v2", "data-v2", "x" * 80 + "a", "x" * 80 + "b", "...", "a" * 59, "a" * 60]
    made = [volume_name("pvc", n) for n in names]
    assert all(len(m) <= 63 and label.fullmatch(m) for m in made), made
    assert len(set(made)) == len(made), made


def test_only_the_jobs_own_pods_reach_its_trainers_except_for_metrics():
    ftj = make_job(distributed={"nodes": 2}, training={"globalBatchSize": 2, "microBatchSize": 1})
    policy = children.build_network_policy(ftj)
    job = children.build_job(ftj, SETTINGS)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    # It selects this job's trainer pods (their labels), and no other job's.
    assert selector.items() <= pod_labels.items() and selector[naming.JOB_LABEL] == "demo"
    own, metrics = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}  # rendezvous, NCCL: any port
    assert metrics == {"ports": [{"port": 9090, "protocol": "TCP"}]} and "from" not in metrics
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == ftj.metadata.uid


@pytest.mark.parametrize(("nodes", "backoff", "expected"), [(1, 0, 0), (1, 2, 2), (2, 2, 4), (4, 3, 12)])
def test_backoff_limit_counts_every_pod_of_an_attempt(nodes, backoff, expected):
    """The Job controller counts failed pods; one failed multi-node attempt fails all its pods, so
    the job's retries are its attempts times its nodes (and not one pod more)."""
    ftj = make_job(backoffLimit=backoff, distributed={"nodes": nodes},
                   resources={"accelerator": "nvidia.com/gpu", "acceleratorsPerNode": 1, "cpu": "2", "memory": "4Gi"},
                   training={"microBatchSize": 1, "globalBatchSize": nodes})
    spec = children.build_job(ftj, SETTINGS)["spec"]
    assert spec["backoffLimit"] == expected
    assert (spec["completions"], spec["parallelism"]) == (nodes, nodes)


def test_trainer_pods_have_the_grace_period_a_sigterm_checkpoint_needs():
    pod = children.build_job(make_job(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120


# The labels and owner reference every child of the "demo" job carries: the selectors of the
# Service and NetworkPolicy, `kubectl get -l`, and the garbage collector's cascade rely on them.
DEMO_LABELS = {
    "app.kubernetes.io/name": "finetune-trainer",
    "app.kubernetes.io/instance": "demo",
    "app.kubernetes.io/managed-by": "finetune-operator",
    "app.kubernetes.io/component": "trainer",
    "finetune.ai/job": "demo",
}
DEMO_OWNER = {"apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob", "name": "demo", "uid": "uid-1",
              "controller": True, "blockOwnerDeletion": True}


def demo_metadata(name):
    return {"name": name, "namespace": "team-a", "labels": DEMO_LABELS, "ownerReferences": [DEMO_OWNER]}


def pod_spec(job):
    return job["spec"]["template"]["spec"]


def test_every_child_is_a_labelled_object_of_the_jobs_namespace_owned_by_the_job():
    ftj = make_job(distributed={"nodes": 2}, training={"globalBatchSize": 2, "microBatchSize": 1})
    cm = children.build_config_map(ftj, SETTINGS)
    assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
    assert cm["metadata"] == demo_metadata("demo-trainer-config")
    job = children.build_job(ftj, SETTINGS)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"] == demo_metadata("demo-trainer")
    svc = children.build_service(ftj)
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service")
    assert svc["metadata"] == demo_metadata("demo-trainer")
    policy = children.build_network_policy(ftj)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"] == demo_metadata("demo-trainer")


def test_config_map_holds_only_the_config_file_the_trainer_reads():
    cm = children.build_config_map(make_job(), SETTINGS)
    assert list(cm["data"]) == ["config.yaml"]
    assert set(cm) == {"apiVersion", "kind", "metadata", "data"}
    # Written in the order of the trainer's schema, for a reader of `kubectl get cm -o yaml`.
    assert list(yaml.safe_load(cm["data"]["config.yaml"]))[:4] == ["jobName", "jobUid", "baseModel", "dataset"]


def test_config_map_pins_the_checkpoint_key_the_pod_mounts():
    digest = "ab" * 32
    cm = children.build_config_map(make_job(), SETTINGS, checkpoint_key_sha256=digest)
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["checkpointing"]["keyFile"] == "/var/run/secrets/finetune/checkpoint-key/key"
    assert config["checkpointing"]["keySha256"] == digest
    job = children.build_job(make_job(), SETTINGS)
    # The key file the config names is where the job mounts the job's key Secret.
    assert {"name": "checkpoint-key", "mountPath": "/var/run/secrets/finetune/checkpoint-key",
            "readOnly": True} in container(job)["volumeMounts"]
    unsigned = yaml.safe_load(children.build_config_map(make_job(), SETTINGS)["data"]["config.yaml"])
    assert "keySha256" not in unsigned["checkpointing"] and "keyFile" not in unsigned["checkpointing"]


def test_config_map_reports_progress_to_the_configured_operator():
    settings = OperatorSettings(progress_url="http://op.sys.svc:8082")
    config = yaml.safe_load(children.build_config_map(make_job(), settings)["data"]["config.yaml"])
    assert config["reporting"]["progressUrl"] == "http://op.sys.svc:8082/v1/namespaces/team-a/finetunejobs/demo/progress"


def test_headless_service_selects_the_jobs_trainer_pods_on_the_rendezvous_port():
    ftj = make_job(distributed={"nodes": 2}, training={"globalBatchSize": 2, "microBatchSize": 1})
    svc = children.build_service(ftj)
    assert svc["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {"finetune.ai/job": "demo", "app.kubernetes.io/component": "trainer"},
        "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
    }
    # Its selector matches the trainer pods the Job makes.
    pod_labels = children.build_job(ftj, SETTINGS)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert f"--master-port={svc['spec']['ports'][0]['port']}" in container(children.build_job(ftj, SETTINGS))["command"]


def test_network_policy_admits_own_pods_on_any_port_and_anyone_on_metrics():
    policy = children.build_network_policy(make_job())
    own = {"matchLabels": {"finetune.ai/job": "demo", "app.kubernetes.io/component": "trainer"}}
    assert policy["spec"] == {
        "podSelector": own,
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": own}]},
            {"ports": [{"port": 9090, "protocol": "TCP"}]},
        ],
    }


@pytest.mark.parametrize(("nodes", "expected"), [(1, False), (2, True), (3, True)])
def test_a_service_is_needed_only_for_several_nodes(nodes, expected):
    ftj = make_job(distributed={"nodes": nodes}, training={"globalBatchSize": 8 * nodes, "microBatchSize": 1},
                   resources={"accelerator": "none", "cpu": "2", "memory": "4Gi"})
    assert children.needs_service(ftj) is expected
    pod = pod_spec(children.build_job(ftj, SETTINGS))
    assert pod.get("subdomain") == ("demo-trainer" if expected else None)


CPU = {"accelerator": "none", "cpu": "2", "memory": "4Gi"}


@pytest.mark.parametrize(("nodes", "resources", "command"), [
    (1, CPU, ["finetune-trainer", "--config", "/etc/finetune/config.yaml"]),
    (1, {"acceleratorsPerNode": 1}, ["finetune-trainer", "--config", "/etc/finetune/config.yaml"]),
    (1, {"acceleratorsPerNode": 2},
     ["torchrun", "--nnodes=1", "--nproc-per-node=2", "--standalone",
      "-m", "finetune_trainer.cli", "--config", "/etc/finetune/config.yaml"]),
    (2, CPU,
     ["torchrun", "--nnodes=2", "--nproc-per-node=1", "--node-rank=$(NODE_RANK)",
      "--master-addr=demo-trainer-0.demo-trainer", "--master-port=29500",
      "-m", "finetune_trainer.cli", "--config", "/etc/finetune/config.yaml"]),
    (3, {"acceleratorsPerNode": 8},
     ["torchrun", "--nnodes=3", "--nproc-per-node=8", "--node-rank=$(NODE_RANK)",
      "--master-addr=demo-trainer-0.demo-trainer", "--master-port=29500",
      "-m", "finetune_trainer.cli", "--config", "/etc/finetune/config.yaml"]),
])
def test_trainer_command_launches_one_process_or_torchrun(nodes, resources, command):
    """One process runs the trainer directly; several on one node rendezvous locally
    (--standalone); several nodes meet at rank 0's pod, through the headless Service."""
    ftj = make_job(distributed={"nodes": nodes}, resources=resources,
                   training={"globalBatchSize": 24 * nodes, "microBatchSize": 1})
    assert children.trainer_command(ftj) == command
    assert container(children.build_job(ftj, SETTINGS))["command"] == command


def test_cpu_job_requests_cpu_and_memory_and_limits_memory_only():
    c = container(children.build_job(make_job(resources=CPU), SETTINGS))
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    # No accelerator: no shared-memory volume for NCCL either.
    assert "dshm" not in [m["name"] for m in c["volumeMounts"]]


def test_accelerator_job_requests_and_limits_its_accelerators():
    ftj = make_job(resources={"accelerator": "amd.com/gpu", "acceleratorsPerNode": 2, "cpu": "16", "memory": "128Gi"},
                   training={"globalBatchSize": 32})
    job = children.build_job(ftj, SETTINGS)
    assert container(job)["resources"] == {
        "requests": {"cpu": "16", "memory": "128Gi", "amd.com/gpu": "2"},
        "limits": {"memory": "128Gi", "amd.com/gpu": "2"},
    }
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod_spec(job)["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]


def test_trainer_container_runs_unprivileged_with_a_read_only_root():
    c = container(children.build_job(make_job(), SETTINGS))
    assert c["name"] == "trainer"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090}]


def test_trainer_pod_runs_as_an_unprivileged_user_without_api_access():
    pod = pod_spec(children.build_job(make_job(), SETTINGS))
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == 120
    assert [c["name"] for c in pod["containers"]] == ["trainer"]
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod


def test_trainer_image_and_pull_policy_come_from_the_settings():
    c = container(children.build_job(make_job(), SETTINGS))
    assert (c["image"], c["imagePullPolicy"]) == ("registry.local/trainer:1", "IfNotPresent")
    settings = OperatorSettings(trainer_image="reg.example/t:2", trainer_image_pull_policy="Always")
    c = container(children.build_job(make_job(), settings))
    assert (c["image"], c["imagePullPolicy"]) == ("reg.example/t:2", "Always")


def test_trainer_env_points_caches_at_the_writable_tmp_and_exposes_rank_and_pod_ip():
    c = container(children.build_job(make_job(), SETTINGS))
    assert c["env"] == [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # Not from the Hub: the trainer must not reach it.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]


def test_hub_base_model_may_reach_the_hub():
    ftj = make_job(baseModel={"source": "hf://org/model"})
    names = [e["name"] for e in container(children.build_job(ftj, SETTINGS))["env"]]
    assert names == ["HOME", "HF_HOME", "PYTHONUNBUFFERED", "NODE_RANK", "POD_IP"]


def test_default_job_mounts_config_tmp_its_claims_and_its_checkpoint_key():
    job = children.build_job(make_job(resources=CPU), SETTINGS)
    assert pod_spec(job)["volumes"] == [
        {"name": "config", "configMap": {"name": "demo-trainer-config"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
        {"name": "checkpoint-key", "secret": {"secretName": "demo-checkpoint-key", "defaultMode": 0o400,
                                              "items": [{"key": "key", "path": "key"}]}},
    ]
    assert container(job)["volumeMounts"] == [
        {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True},
        {"name": "pvc-models", "mountPath": "/mnt/output", "readOnly": False, "subPath": "demo"},
        {"name": "checkpoint-key", "mountPath": "/var/run/secrets/finetune/checkpoint-key", "readOnly": True},
    ]


def test_hub_token_is_mounted_read_only_where_the_config_names_it():
    ftj = make_job(baseModel={"source": "hf://org/model", "credentialsSecret": "hf-token"}, resources=CPU)
    job = children.build_job(ftj, SETTINGS)
    assert [v for v in pod_spec(job)["volumes"] if v["name"] == "base-model-credentials"] == [{
        "name": "base-model-credentials",
        "secret": {"secretName": "hf-token", "defaultMode": 0o400, "items": [{"key": "token", "path": "token"}]},
    }]
    assert [m for m in container(job)["volumeMounts"] if m["name"] == "base-model-credentials"] == [
        {"name": "base-model-credentials", "mountPath": "/var/run/secrets/finetune/base-model", "readOnly": True}]


def test_progress_token_is_short_lived_bound_to_the_pod_and_mounted_read_only():
    settings = OperatorSettings(progress_url="http://op.sys.svc:8082")
    job = children.build_job(make_job(), settings)
    assert [v for v in pod_spec(job)["volumes"] if v["name"] == "progress-token"] == [{
        "name": "progress-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": "finetune.ai/progress", "expirationSeconds": 3600, "path": "token"}}]},
    }]
    assert [m for m in container(job)["volumeMounts"] if m["name"] == "progress-token"] == [
        {"name": "progress-token", "mountPath": "/var/run/secrets/finetune/progress", "readOnly": True}]
    without = children.build_job(make_job(), SETTINGS)
    assert "progress-token" not in [v["name"] for v in pod_spec(without)["volumes"]]
    assert "progress-token" not in [m["name"] for m in container(without)["volumeMounts"]]


def test_job_spec_runs_one_indexed_pod_per_node_and_fails_fast_on_user_errors():
    ftj = make_job(distributed={"nodes": 2}, backoffLimit=1, resources=CPU,
                   training={"globalBatchSize": 2, "microBatchSize": 1})
    spec = children.build_job(ftj, SETTINGS)["spec"]
    assert {k: v for k, v in spec.items() if k != "template"} == {
        "suspend": False,
        "completionMode": "Indexed",
        "completions": 2,
        "parallelism": 2,
        "backoffLimit": 2,
        "podFailurePolicy": failures.pod_failure_policy("trainer"),
    }
    assert spec["template"]["metadata"] == {"labels": DEMO_LABELS, "annotations": {}}


def test_a_suspended_job_creates_a_suspended_trainer_job():
    assert children.build_job(make_job(suspend=True), SETTINGS)["spec"]["suspend"] is True
    assert children.build_job(make_job(suspend=False), SETTINGS)["spec"]["suspend"] is False


def test_karpenter_placement_keeps_its_nodes_and_annotates_the_pod_not_the_spec():
    ftj = make_job(nodePool={"provisioner": "karpenter",
                             "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}})
    template = children.build_job(ftj, SETTINGS)["spec"]["template"]
    assert template["metadata"] == {"labels": DEMO_LABELS, "annotations": {"karpenter.sh/do-not-disrupt": "true"}}
    assert template["spec"]["nodeSelector"] == {"karpenter.sh/nodepool": "finetune-uid-1"}
    assert template["spec"]["tolerations"] == [
        {"key": "finetune.ai/job", "operator": "Equal", "value": "uid-1", "effect": "NoSchedule"}]
    assert "annotations" not in template["spec"]


def test_no_placement_leaves_scheduling_to_the_cluster():
    pod = pod_spec(children.build_job(make_job(), SETTINGS))
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_no_deadline_leaves_the_job_unbounded():
    assert "activeDeadlineSeconds" not in children.build_job(make_job(), SETTINGS)["spec"]
