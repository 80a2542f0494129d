"""Every spec the real API server accepts reaches a phase, against the operator from source.

The schema and CEL rules judge a FineTuneJob at `kubectl apply`; the operator then builds its
children (ConfigMap, Job, Service, NodePool, the Model it will publish), which the API server
judges again by their own rules. Where the two disagree, a job used to sit with no phase at all,
retried forever. Now the operator asks the API server (a dry run of every child and of the
Model) before it creates anything, and a refusal is `Failed/InvalidSpec` with the server's words.

The inputs are ordinary ones that once fell between the two validators, and seeded random
combinations of them: names with dots or leading digits, a claim name with a dot, a lowercase
`mi`, spaces in label values, a toleration the API refuses, a Model name the Model CRD refuses.
"""

from __future__ import annotations

import copy
import json
import random

import pytest

from kubetools import Kubectl, wait_for
from spec_cases import VALID

pytestmark = pytest.mark.integration

# (path, value): each plausible, each valid in isolation as far as a user can tell.
MUTATIONS = [
    ("spec.dataset.source", "pvc://data.v2/train.jsonl"),
    ("spec.dataset.source", "pvc://data/sub\u00a0dir/train.jsonl"),
    ("spec.output.destination", "pvc://models.v2/out"),
    ("spec.output.modelName", "a..b"),
    ("spec.output.modelName", "Upper-Case"),
    ("spec.resources.memory", "512mi"),
    ("spec.resources.memory", "8Gi"),
    ("spec.resources.cpu", "1500m"),
    ("spec.resources.instanceType", "g5 xlarge"),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"team": "research lab"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"bad key!": "x"}}),
    ("spec.nodePool", {"provisioner": "existing",
                       "tolerations": [{"key": "gpu", "operator": "Exists", "value": "v", "effect": "NoSchedule"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [{"key": "gpu", "operator": "Equal", "value": "a b"}]}),
    ("spec.distributed", {"nodes": 2}),
    ("spec.training", {"globalBatchSize": 8}),
]
NAMES = ["team.a-sft", "7b-sft", "sft", "x" * 60, "a.b.c"]


def manifest(name: str, mutations: list[tuple[str, object]]) -> dict:
    out = copy.deepcopy(VALID)
    out["metadata"]["name"] = name
    for path, value in mutations:
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    out["spec"].setdefault("resources", {"accelerator": "none", "cpu": "1", "memory": "1Gi"})
    out["spec"]["resources"].setdefault("accelerator", "none")
    return out


def cases(count: int, seed: int = 20261201) -> list[dict]:
    """Each mutation alone under a plain name, each name alone (several nodes too), then random mixes."""
    rng = random.Random(seed)
    out = [manifest(f"one-{i}", [m]) for i, m in enumerate(MUTATIONS)]
    out += [manifest(name, [("spec.distributed", {"nodes": 2})]) for name in NAMES]
    while len(out) < count:
        name = rng.choice(NAMES[:2] + [f"mix-{len(out)}"])
        name = f"{name}-{len(out)}" if not name.startswith("mix-") else name
        out.append(manifest(name, rng.sample(MUTATIONS, rng.randint(2, 4))))
    return out


def test_every_accepted_spec_reaches_a_phase_and_none_is_left_in_limbo(kubectl: Kubectl, operator) -> None:
    accepted, refused = [], 0
    for m in cases(45):
        result = kubectl.apply(m, check=False)
        if result.returncode == 0:
            accepted.append(m)
        else:
            refused += 1
    assert accepted and refused, (len(accepted), refused)  # both sides of the fence are exercised

    def phased() -> list[dict] | None:
        jobs = {j["metadata"]["name"]: j for j in kubectl.items("finetunejobs")}
        found = [jobs.get(m["metadata"]["name"]) for m in accepted]
        return found if all(j and (j.get("status") or {}).get("phase") for j in found) else None
    try:
        found = wait_for(phased, 180, interval=1, what="every accepted FineTuneJob to have a phase")
    except AssertionError:
        jobs = {j["metadata"]["name"]: j for j in kubectl.items("finetunejobs")}
        missing = [m["metadata"]["name"] for m in accepted
                   if not (jobs.get(m["metadata"]["name"], {}).get("status") or {}).get("phase")]
        raise AssertionError(f"{len(missing)} of {len(accepted)} accepted specs have no phase: {missing}") from None

    trainer_jobs = {j["metadata"]["name"] for j in kubectl.items("jobs")}
    for job in found:
        st, name = job["status"], job["metadata"]["name"]
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        if st["phase"] == "Failed":
            # Refused before anything was created, with the API server's reason.
            assert failed["reason"] == "InvalidSpec" and failed["message"], (name, st)
            assert f"{name}-trainer" not in trainer_jobs, f"{name} failed but its trainer Job was created"
        else:
            assert f"{name}-trainer" in trainer_jobs, (name, json.dumps(st)[:500])


def test_a_claim_with_a_dot_in_its_name_is_mounted(kubectl: Kubectl, operator) -> None:
    """A claim's name is a DNS subdomain and may hold dots; the pod volume for it gets a name the
    API server accepts."""
    kubectl.apply(manifest("dotted-claim", [("spec.dataset.source", "pvc://data.v2/train.jsonl")]))
    job = wait_for(lambda: kubectl.get("job", "dotted-claim-trainer"), 60, what="the trainer Job")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert any((v.get("persistentVolumeClaim") or {}).get("claimName") == "data.v2" for v in volumes.values()), volumes


@pytest.mark.parametrize("name,mutations,refused_by", [
    # The Model CRD refuses the name: caught at the start, not after training.
    ("model-name", [("spec.output.modelName", "a..b")], "Model a..b"),
    # The pod template's rules: a toleration with operator Exists takes no value.
    ("exists-with-value", [("spec.nodePool", {"provisioner": "existing", "tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "v", "effect": "NoSchedule"}]})], "Job exists-with-value-trainer"),
])
def test_a_child_the_api_server_refuses_fails_the_job_at_once(kubectl: Kubectl, operator, name, mutations, refused_by) -> None:
    m = manifest(name, mutations)
    kubectl.apply(m)
    job = wait_for(lambda: (j := kubectl.get("ftj", name)) and (j.get("status") or {}).get("phase") and j, 60,
                   what=f"{name} to have a phase")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert (job["status"]["phase"], failed["reason"]) == ("Failed", "InvalidSpec"), job["status"]
    assert f"the API server refused {refused_by}" in failed["message"], failed["message"]
    assert kubectl.get("job", f"{name}-trainer") is None and kubectl.get("configmap", f"{name}-trainer-config") is None
    events = [e for e in kubectl.items("events") if e["involvedObject"]["name"] == name and e["reason"] == "InvalidSpec"]
    assert events, "no InvalidSpec event"
