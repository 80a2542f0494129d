import pytest

from finetune_operator.sources import UnsupportedSource, merge_mounts, resolve


def test_pvc_paths_are_confined_to_their_mount():
    r = resolve("pvc://data/a/./b//c.jsonl", "dataset.source")
    assert r.value == "/mnt/pvc/data/a/b/c.jsonl"
    assert r.mount.claim == "data" and r.mount.read_only


@pytest.mark.parametrize("uri", ["pvc://data/../etc/passwd", "pvc://data/a/../../x", "configmap://cm/../k"])
def test_parent_segments_are_refused(uri):
    with pytest.raises(UnsupportedSource, match=r"must not contain '\.\.'"):
        resolve(uri, "dataset.source")


def test_configmap_dataset():
    r = resolve("configmap://train-data/train.jsonl", "dataset.source")
    assert r.value == "/mnt/configmap/train-data/train.jsonl" and r.mount.config_map == "train-data"


def test_preset_and_hub_pass_through_for_inputs_only():
    assert resolve("preset://tiny-llama", "baseModel.source").value == "preset://tiny-llama"
    with pytest.raises(UnsupportedSource):
        resolve("hf://org/out", "output.destination", writable=True)


def test_writable_mount_wins():
    a = resolve("pvc://x/in.jsonl", "dataset.source")
    b = resolve("pvc://x/out", "output.destination", writable=True)
    (merged,) = merge_mounts(a, b)
    assert merged.read_only is False
