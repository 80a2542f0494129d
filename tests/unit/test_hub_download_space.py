"""Where hf:// base models are downloaded: the namespace's shared cache claim, or a bounded
scratch directory of the pod's own."""

from __future__ import annotations

import yaml
from factories import make_job

from finetune_operator import children, reconcile, trainer_config
from finetune_operator.settings import OperatorSettings

HUB = {"source": "hf://meta-llama/Llama-3.1-8B", "revision": "main"}


def built(job, **settings):
    s = OperatorSettings(**settings)
    pod = children.build_job(job, s)["spec"]["template"]["spec"]
    config = yaml.safe_load(children.build_config_map(job, s)["data"][trainer_config.CONFIG_FILE])
    return pod, config


def test_an_hf_model_is_read_from_and_downloaded_into_the_shared_cache_claim():
    job = make_job(baseModel=HUB)
    pod, config = built(job, model_cache_claim="hub-cache")
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hub-cache"}} in pod["volumes"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model-cache")
    assert mount["mountPath"] == config["baseModel"]["cacheDir"] == trainer_config.MODEL_CACHE_DIR
    assert not mount.get("readOnly")  # the first job of a revision downloads it for the others
    # The operator checks the claim exists before creating the Job, like any input.
    assert ("PersistentVolumeClaim", "hub-cache") in reconcile.mounted_objects(children.build_job(
        job, OperatorSettings(model_cache_claim="hub-cache")), set())


def test_a_model_not_from_the_hub_does_not_mount_the_cache():
    pod, config = built(make_job(), model_cache_claim="hub-cache")
    assert all(v["name"] != "model-cache" for v in pod["volumes"])
    assert "cacheDir" not in config["baseModel"]


def test_without_a_cache_the_download_space_is_requested_and_bounded():
    pod, config = built(make_job(baseModel=HUB), hub_scratch_size="40Gi")
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"sizeLimit": "40Gi"}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    assert "cacheDir" not in config["baseModel"]
    # Not asked for, nothing changes: an unbounded emptyDir, no request.
    pod, _ = built(make_job(baseModel=HUB))
    assert next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"] == {}
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]
