import re

import pytest
import yaml
from factories import make_job

from finetune_operator import children, failures
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
    assert config["output"]["dir"] == "/mnt/pvc/models/demo"
    assert config["baseModel"]["source"] == "preset://tiny-llama"
    assert config["reporting"]["terminationMessagePath"] == "/dev/termination-log"
    assert config["publish"]["sourceJob"] == {"name": "demo", "uid": "uid-1"}
    assert config["publish"]["uri"] == "pvc://models/demo"  # the user's URI, not the pod's path
    assert config["training"]["globalBatchSize"] == 32


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
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in policy["rules"]


def test_volumes_one_per_claim_and_output_is_writable():
    ftj = make_job(dataset={"source": "pvc://shared/data.jsonl"}, output={"destination": "pvc://shared/out"})
    job = children.build_job(ftj, SETTINGS)
    mounts = [m for m in container(job)["volumeMounts"] if m["mountPath"].startswith("/mnt/pvc")]
    assert mounts == [{"name": "pvc-shared", "mountPath": "/mnt/pvc/shared", "readOnly": False}]


def test_secret_mounted_for_hub_token():
    job = children.build_job(make_job(baseModel={"source": "hf://org/model", "credentialsSecret": "hf-token"}), SETTINGS)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["base-model-credentials"]["secret"]["secretName"] == "hf-token"
    env = {e["name"] for e in container(job)["env"]}
    assert "HF_HUB_OFFLINE" not in env
    assert not any("token" in str(e.get("value", "")) for e in container(job)["env"])  # never in env


def test_existing_provisioner_places_by_selector_and_tolerations():
    ftj = make_job(nodePool={"provisioner": "existing", "nodeSelector": {"pool": "gpu"},
                             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    pod = children.build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_deadline_maps_to_the_job():
    assert children.build_job(make_job(activeDeadlineSeconds=600), SETTINGS)["spec"]["activeDeadlineSeconds"] == 600


@pytest.mark.parametrize("field,value,message", [
    ("dataset", {"source": "s3://bucket/x.jsonl"}, "dataset.source: s3:// is not supported"),
    ("output", {"destination": "oci://reg/repo:tag"}, "output.destination: oci:// is not supported"),
    ("dataset", {"source": "configmap://only-name"}, "configmap:// needs NAME/KEY"),
])
def test_unsupported_sources_are_refused_before_anything_is_built(field, value, message):
    with pytest.raises(UnsupportedSource, match=message.replace("(", r"\(")):
        children.build_config_map(make_job(**{field: value}), SETTINGS)


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
