"""Trainer pod settings: the operator's defaults (chart value trainer.pod) under each job's own."""

from __future__ import annotations

from factories import make_job

from finetune_operator import children, naming
from finetune_operator.api import RESERVED_ENV, TrainerPodSpec
from finetune_operator.settings import OperatorSettings

DEFAULTS = TrainerPodSpec.model_validate({
    "serviceAccountName": "default-trainer", "priorityClassName": "batch-low", "imagePullSecrets": ["shared-cred"],
    "labels": {"team": "platform", "tier": "batch"}, "annotations": {"sidecar.istio.io/inject": "false"},
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
})


def pod_of(job, **settings) -> dict:
    return children.build_job(job, OperatorSettings(**settings))["spec"]["template"]


def test_a_jobs_own_values_win_field_by_field_and_key_by_key():
    job = make_job(trainerPod={"priorityClassName": "gpu-high", "imagePullSecrets": ["team-cred", "shared-cred"],
                               "labels": {"team": "nlp"}, "annotations": {"example.com/cost-center": "42"},
                               "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]})
    template = pod_of(job, trainer_pod=DEFAULTS)
    pod = template["spec"]
    assert pod["serviceAccountName"] == "default-trainer"  # not set by the job: the default
    assert pod["priorityClassName"] == "gpu-high"
    assert pod["imagePullSecrets"] == [{"name": "shared-cred"}, {"name": "team-cred"}]
    assert template["metadata"]["labels"] == {"team": "nlp", "tier": "batch", **naming.labels(job)}
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false", "example.com/cost-center": "42"}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["HTTPS_PROXY"] == "http://proxy:3128"
    # Still no API token, whichever ServiceAccount the pod runs as.
    assert pod["automountServiceAccountToken"] is False


def test_without_settings_the_pod_names_no_account_class_or_pull_secret():
    pod = pod_of(make_job())["spec"]
    assert not {"serviceAccountName", "priorityClassName", "imagePullSecrets"} & pod.keys()
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 1000


def test_the_uid_can_be_left_to_the_cluster():
    security = pod_of(make_job(), trainer_run_as_user=None)["spec"]["securityContext"]
    assert security == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_of(make_job(), trainer_run_as_user=4242)["spec"]["securityContext"]["runAsGroup"] == 4242


def test_the_operators_own_env_is_all_reserved_so_extra_env_cannot_shadow_it():
    job = make_job(baseModel={"source": "preset://tiny-llama"})
    own = [e["name"] for e in pod_of(job)["spec"]["containers"][0]["env"]]
    assert set(own) <= set(RESERVED_ENV), set(own) - set(RESERVED_ENV)
    # Keys the operator's labels use are refused for extra labels, so it never has to choose.
    assert all(k.startswith(("app.kubernetes.io/", "finetune.ai/")) for k in naming.labels(job))


def test_pull_secrets_of_both_sides_may_exceed_what_one_side_may_name():
    many = [f"cred-{i}" for i in range(8)]
    job = make_job(trainerPod={"imagePullSecrets": many})
    pod = pod_of(job, trainer_pod=TrainerPodSpec(image_pull_secrets=["shared-cred"]))["spec"]
    assert [s["name"] for s in pod["imagePullSecrets"]] == ["shared-cred", *many]
