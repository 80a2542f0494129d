"""Every spec the real API server accepts reaches a phase, against the operator from source.

The schema and CEL rules judge a FineTuneJob at `kubectl apply`; the operator then builds its
children (ConfigMap, Job, Service, NodePool, the Model it will publish), which the API server
judges again by their own rules. Where the two disagree, a job used to sit with no phase at all,
retried forever. Now the operator asks the API server (a dry run of every child and of the
Model) before it creates anything, and a refusal is `Failed/InvalidSpec` with the server's words.

The inputs are ordinary ones that once fell between the two validators, and seeded random
combinations of them: names with dots or leading digits, a claim name with a dot, a lowercase
`mi` and other quantities, label keys and values with odd characters, reserved keys, tolerations
the core API refuses, Unicode whitespace in paths, a Model name the Model CRD refuses. The same
specs also check that the operator's parser (pydantic) and the API server agree on each one.
"""

from __future__ import annotations

import copy
import json
import random

from pydantic import ValidationError

import pytest

from finetune_operator import api
from kubetools import Kubectl, wait_for
from spec_cases import VALID

pytestmark = pytest.mark.integration

# (path, value): each plausible, each valid in isolation as far as a user can tell.
MUTATIONS = [
    ("spec.dataset.source", "pvc://data.v2/train.jsonl"),
    ("spec.dataset.source", "pvc://data/sub\u00a0dir/train.jsonl"),
    ("spec.dataset.source", "pvc://data/sub\u2003dir/train.jsonl"),
    ("spec.dataset.source", "pvc://data/sub%20dir/train.jsonl"),
    ("spec.output.destination", "pvc://models.v2/out"),
    ("spec.output.destination", "pvc://models/out\u3000v2"),
    ("spec.output.modelName", "a..b"),
    ("spec.output.modelName", "Upper-Case"),
    ("spec.output.modelName", "bot.v2"),
    ("spec.dataset.credentialsSecret", "token..x"),
    ("spec.resources.memory", "512mi"),
    ("spec.resources.memory", "8Gi"),
    ("spec.resources.memory", "1.5Gi"),
    ("spec.resources.memory", "2e9"),
    ("spec.resources.memory", "0"),
    ("spec.resources.memory", "1\u00a0Gi"),
    ("spec.resources.cpu", "1500m"),
    ("spec.resources.cpu", ".5"),
    ("spec.resources.cpu", "-1"),
    ("spec.resources.cpu", "1n"),
    ("spec.resources.instanceType", "g5 xlarge"),
    ("spec.resources.instanceType", "g5.xlarge"),
    ("spec.resources.instanceType", "Standard_NC6s_v3"),
    ("spec.resources.instanceType", "g5.xlarge-"),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"team": "research lab"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"team": "research\u00a0lab"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"team": "_lab"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"team": "Lab_2.a-b", "example.com/empty": ""}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"bad key!": "x"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"Example.com/team": "x"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"karpenter.sh/nodepool": "finetune-0"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"finetune.ai/job-uid": "0"}}),
    ("spec.nodePool", {"provisioner": "existing", "nodeSelector": {"kubernetes.io/hostname": "gpu-0"}}),
    ("spec.nodePool", {"provisioner": "existing",
                       "tolerations": [{"key": "gpu", "operator": "Exists", "value": "v", "effect": "NoSchedule"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [{"key": "gpu", "operator": "Equal", "value": "a b"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [{"operator": "Exists"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [{"key": "", "operator": "Equal", "value": "x"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [{"key": "finetune.ai/job", "operator": "Exists"}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]}),
    ("spec.nodePool", {"provisioner": "existing", "tolerations": [
        {"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "example.com/dedicated", "value": "ml_team.1", "effect": "PreferNoSchedule"}]}),
    ("spec.distributed", {"nodes": 2}),
    ("spec.training", {"globalBatchSize": 8}),
]
NAMES = ["team.a-sft", "7b-sft", "sft", "x" * 60, "a.b.c"]


@pytest.fixture(autouse=True)
def claims_the_specs_name(kubectl: Kubectl) -> None:
    """The claims the base spec and the dotted-claim case mount: the operator creates a trainer
    Job only once what its pods mount exists (unbound is enough: nothing runs here). Claims a
    generated spec invents are left missing, and such a job waits (WaitingForInputs)."""
    for claim in ("data", "models", "data.v2"):
        kubectl.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                       "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})


def manifest(name: str, mutations: list[tuple[str, object]]) -> dict:
    out = copy.deepcopy(VALID)
    out["metadata"]["name"] = name
    for path, value in mutations:
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    # Destinations are exclusive: each job writes under its own name.
    out["spec"]["output"]["destination"] += f"/{name}"
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
        result = kubectl.apply(json.dumps(m), check=False)  # JSON: YAML would make 2e9 a number
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
            # Running, or waiting for a claim the spec names that this test did not create (the
            # operator checks what the pods mount before it creates their Job).
            waiting = any(c.get("reason") == "WaitingForInputs" for c in st["conditions"])
            assert f"{name}-trainer" in trainer_jobs or waiting, (name, json.dumps(st)[:500])
    # And the CRD foresaw every refusal: what it accepts, the operator can run.
    invalid = {j["metadata"]["name"]: next(c for c in j["status"]["conditions"] if c["type"] == "Failed")["message"]
               for j in found if j["status"]["phase"] == "Failed"}
    assert not invalid, f"accepted at apply, refused later: {invalid}"


def test_the_parser_and_the_api_server_agree_on_every_spec(kubectl: Kubectl) -> None:
    """One fact, one place: every rule is declared once in api.py, for the CRD and the parser alike;
    a spec one accepts and the other refuses is a rule written twice, or in two regex dialects."""
    disagree = []
    for m in cases(80, seed=7):
        m["metadata"]["name"] = "agree"  # metadata rules are the API server's alone
        server = kubectl.apply(json.dumps(m), dry_run=True, check=False)
        try:
            api.FineTuneJob.model_validate({**m, "metadata": {**m["metadata"], "namespace": kubectl.namespace}})
            parsed = None
        except ValidationError as exc:
            parsed = api.api_errors(exc)
        if (server.returncode == 0) != (parsed is None):
            disagree.append((m["spec"], server.stderr.strip()[-300:], parsed))
    assert not disagree, "\n".join(map(repr, disagree))


def test_a_claim_with_a_dot_in_its_name_is_mounted(kubectl: Kubectl, operator) -> None:
    """A claim's name is a DNS subdomain and may hold dots; the pod volume for it gets a name the
    API server accepts."""
    kubectl.apply(manifest("dotted-claim", [("spec.dataset.source", "pvc://data.v2/train.jsonl")]))
    job = wait_for(lambda: kubectl.get("job", "dotted-claim-trainer"), 60, what="the trainer Job")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert any((v.get("persistentVolumeClaim") or {}).get("claimName") == "data.v2" for v in volumes.values()), volumes


@pytest.fixture
def admission_refuses(kubectl: Kubectl):
    """A ValidatingAdmissionPolicy in the test namespace that refuses Jobs and Models named
    refused-*: a child the CRD cannot foresee being refused (a cluster's own policies). The specs
    that used to reach this path (a Model name a..b, a toleration Exists with a value) are now
    refused at apply."""
    name = f"refuse-{kubectl.namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy", "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [
                {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["jobs"]},
                {"apiGroups": ["finetune.ai"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"], "resources": ["models"]},
            ]},
            "validations": [{"expression": "!object.metadata.name.startsWith('refused-')",
                             "message": "this namespace refuses objects named refused-*"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kubectl.namespace}}}},
    }
    kubectl.apply(policy)
    kubectl.apply(binding)
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "refused-probe"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}
    wait_for(lambda: kubectl.apply(probe, dry_run=True, check=False).returncode != 0, 30, interval=0.5,
             what="the admission policy to be in force")
    yield
    kubectl("delete", "validatingadmissionpolicybinding", name, "--ignore-not-found")
    kubectl("delete", "validatingadmissionpolicy", name, "--ignore-not-found")


@pytest.mark.parametrize("name,mutations,refused_by", [
    # The Model it would publish is refused: caught at the start, not after training.
    ("model-refused", [("spec.output.modelName", "refused-model")], "Model refused-model"),
    # Its trainer Job is refused.
    ("refused-job", [], "Job refused-job-trainer"),
])
def test_a_child_the_api_server_refuses_fails_the_job_at_once(kubectl: Kubectl, operator, admission_refuses,
                                                              name, mutations, refused_by) -> None:
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
