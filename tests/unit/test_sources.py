import pytest

from finetune_operator.sources import UnsupportedSource, merge_mounts, overlaps, resolve, volumes_of


def test_pvc_paths_are_confined_to_their_mount():
    r = resolve("pvc://data/a/./b//c.jsonl", "dataset.source")
    assert r.value == "/mnt/pvc/data/a/b/c.jsonl"
    assert r.mount.claim == "data" and r.mount.read_only
    assert r.root == "/mnt/pvc/data"  # what the trainer confines it to, symlinks resolved


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


def test_output_mounts_only_its_directory_and_inputs_share_one_read_only_mount():
    a = resolve("pvc://x/in.jsonl", "dataset.source")
    m = resolve("pvc://x/base", "baseModel.source")
    b = resolve("pvc://x/out/./run", "output.destination", writable=True)
    assert b.value == "/mnt/output" and b.root == "/mnt/output"
    assert (b.mount.sub_path, b.mount.read_only) == ("out/run", False)
    assert a.root == m.root == "/mnt/pvc/x"
    merged = merge_mounts(a, m, b)
    assert [(x.mount_path, x.read_only, x.sub_path) for x in merged] == [("/mnt/pvc/x", True, ""),
                                                                         ("/mnt/output", False, "out/run")]
    assert volumes_of(merged) == [{"name": "pvc-x", "persistentVolumeClaim": {"claimName": "x"}}]


def test_local_run_roots_are_the_claim_directories():
    r = resolve("pvc://data/a/b.jsonl", "dataset.source", claim_dirs={"data": "/srv/data"})
    assert (r.value, r.root, r.mount) == ("/srv/data/a/b.jsonl", "/srv/data", None)


@pytest.mark.parametrize("a, b, expected", [
    ("pvc://models/a", "pvc://models/a", True),
    ("pvc://models/a/", "pvc://models//a", True),
    ("pvc://models/a", "pvc://models/a/b", True),   # nested, either way round
    ("pvc://models/a/b/c", "pvc://models/a", True),
    ("pvc://models", "pvc://models/a", True),       # the whole claim holds every path in it
    ("pvc://models/a", "pvc://models/ab", False),   # a prefix of the name is not a parent
    ("pvc://models/a", "pvc://other/a", False),
    ("pvc://models/a", "s3://models/a", False),
])
def test_destinations_overlap_when_one_is_or_holds_the_other(a, b, expected):
    assert overlaps(a, b) is expected and overlaps(b, a) is expected
