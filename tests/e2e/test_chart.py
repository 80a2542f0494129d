"""The Helm chart, for real: lint, schema validation of every rendering by the real API server,
and an install whose operator (a pod of the operator image on the cluster's real node, with the
chart's securityContext in effect, in-cluster credentials, the chart's RBAC) trains a job in the
trainer image to a Ready Model; then uninstall leaves only what Helm conventions keep.

Validation: `kubectl apply --dry-run=server --validate=strict` against the local API server,
rather than kubeconform. The API server is what kubeconform approximates: it checks every object
against the OpenAPI schemas of exactly the Kubernetes version we run (and our CRDs' schemas),
rejects unknown or duplicate fields (strict), and runs admission (e.g. RBAC objects whose
namespaces must exist). kubeconform would need a Go build plus a schema set generated offline
from this same server, and would still skip admission.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from kubetools import REPO, VENV_BIN, Kubectl, free_port, wait_for
from spec_cases import VALID

from conftest import CHART, LOCAL_NODE_VALUES, OPERATOR_IMAGE, TRAINER_IMAGE, containerd_task, volume_dirs

pytestmark = pytest.mark.integration
RELEASE_KINDS = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,configmaps,secrets"


def test_lint(helm) -> None:
    for extra in ([], ["-f", str(LOCAL_NODE_VALUES)], ["--set", "watchNamespaces={a,b}", "--set", "karpenter.enabled=true"]):
        out = helm("lint", "--strict", str(CHART), *extra).stdout
        assert "0 chart(s) failed" in out, out


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("values", [
    [],
    ["-f", str(LOCAL_NODE_VALUES)],
    ["--set", "watchNamespaces={NS}", "--set", "karpenter.enabled=true", "--set", "replicaCount=2",
     "--set-json", 'karpenter.nodeClassRef={"group":"karpenter.kwok.sh","kind":"KWOKNodeClass","name":"default"}',
     "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.trainerPodMonitor.enabled=true",
     "--set", "progress.enabled=false"],
    ["--set", "replicaCount=2", "--set", "podDisruptionBudget.enabled=true", "--set", "podAnnotations.example\\.com/a=b",
     "--set-json", 'topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname",'
     '"whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/name":"finetune-operator"}}}]',
     "--set-json", 'extraEnv=[{"name":"NO_PROXY","value":".svc"}]', "--set", "trainer.runAsUser=null",
     "--set-json", 'trainer.pod={"env":[{"name":"NCCL_DEBUG","value":"INFO"}]}'],
], ids=["defaults", "local-node", "namespaced-karpenter", "extras"])
def test_template_is_valid_for_the_api_server(helm, kubectl: Kubectl, namespace: str, values: list[str]) -> None:
    values = [v.replace("NS", namespace) for v in values]
    rendered = helm("template", "v", str(CHART), "--namespace", namespace, "--include-crds", *values).stdout
    docs = _docs(rendered)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment", "Service"} <= kinds
    # The prometheus-operator CRD is not installed here: check the ServiceMonitor by hand.
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics"))
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    # The PodMonitor selects the trainer pods the operator builds, on the port their container names.
    from finetune_operator import children
    from finetune_operator.api import FineTuneJob
    from finetune_operator.settings import OperatorSettings

    job = FineTuneJob.model_validate({"metadata": {"name": "demo", "namespace": namespace, "uid": "u"}, "spec": {
        "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"destination": "pvc://models/demo"}}})
    trainer = children.build_job(job, OperatorSettings())["spec"]["template"]
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= trainer["metadata"]["labels"].items()
        port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        assert port in [p["name"] for p in trainer["spec"]["containers"][0]["ports"]]
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    checked = [d for d in docs if d["kind"] not in ("ServiceMonitor", "PodMonitor")]
    cluster = Kubectl(kubectl.kubeconfig)  # objects carry their own namespaces
    proc = cluster("apply", "--server-side", "--force-conflicts", "--dry-run=server", "--validate=strict", "-f", "-",
                   input=yaml.safe_dump_all(checked), check=False)
    assert proc.returncode == 0, proc.stderr
    if "watchNamespaces" in " ".join(values):
        # Namespaced RBAC; cluster-wide only what is cluster-scoped: NodePools and TokenReviews.
        # (The users' roles are ClusterRoles too, aggregated into edit/view and bound to nobody here.)
        def for_users(d: dict) -> bool:
            return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in d["metadata"].get("labels", {}))
        operator_roles = [d for d in docs if d["kind"] == "ClusterRole" and not for_users(d)]
        assert {d["metadata"]["name"] for d in operator_roles} == {"v-finetune-operator-node-pools",
                                                                   "v-finetune-operator-token-review"}
        assert {res for d in operator_roles for r in d["rules"] for res in r["resources"]} == {"nodepools", "tokenreviews"}
        user_rules = [r for d in docs if d["kind"] == "ClusterRole" and for_users(d) for r in d["rules"]]
        assert not any("/" in res for r in user_rules for res in r["resources"])  # no status subresource
        assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in user_rules if "models" in r["resources"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"livenessProbe", "readinessProbe", "resources"} <= container.keys()
    # On the host network the old pod must go before the new one can bind its ports: Recreate
    # (with maxUnavailable instead, `helm --wait` would count zero ready pods as done).
    host_network = pod.get("hostNetwork", False)
    assert (deployment["spec"].get("strategy", {}).get("type") == "Recreate") == host_network


def _released(helm, release: str, namespace: str) -> None:
    helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", check=False)


def _image_ref(pod: dict) -> str:
    return pod["status"]["containerStatuses"][0]["image"]


def _crd_epochs(cluster: Kubectl) -> dict:
    crd = cluster.get("crd", "finetunejobs.finetune.ai")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["training"]["properties"]["epochs"]


def test_upgrade_from_the_previous_release_mid_run_then_train_and_uninstall(
        helm, kubectl: Kubectl, namespace: str, claims, local_node, previous_release, tmp_path: Path) -> None:
    """The last release's chart (its CRDs, its operator image, built from its commit) runs a job;
    mid-run the CRDs are applied and the release upgraded as docs/install.md says; the trainer
    pod runs on untouched and the new operator finishes the job. Then everything an install
    promises, and an uninstall that leaves only what Helm conventions keep. (The old release runs
    the current trainer image: a release's trainer image is not rebuilt here.)"""
    release = f"e2e-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-finetune-operator"
    cluster = Kubectl(kubectl.kubeconfig)
    # The operator pod shares the node's ports: free ones, and a Service address of its own.
    ports = {"metrics.port": free_port(), "healthPort": free_port(), "progress.port": free_port()}
    cluster_ip = f"127.96.{random.randint(100, 250)}.{random.randint(1, 254)}"

    def values_for(chart: Path, **extra) -> Path:
        values = {**yaml.safe_load((chart / "ci" / "local-node-values.yaml").read_text()), "watchNamespaces": [namespace], **extra}
        values["metrics"] = {**values["metrics"], "port": ports["metrics.port"]}
        values["healthPort"] = ports["healthPort"]
        values["progress"] = {"port": ports["progress.port"], "service": {"clusterIP": cluster_ip}}
        path = tmp_path / f"values-{chart.parent.parent.name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def leads(pod_name: str) -> None:
        # A stopped leader may leave its Lease to expire: up to its duration, then some.
        wait_for(lambda: (kubectl.get("lease", fullname) or {}).get("spec", {}).get("holderIdentity") == pod_name, 90,
                 what=f"{pod_name} to take the operator's Lease")

    paused = None
    try:
        # The previous release, as it was installed: its CRDs, then its chart.
        cluster("apply", "--server-side", "--force-conflicts", "-f", str(previous_release.chart / "crds"))
        assert _crd_epochs(cluster).get("type") == "integer"  # 0.1.0: epochs was a plain integer
        old_trainer = {**yaml.safe_load((previous_release.chart / "ci" / "local-node-values.yaml").read_text())["trainer"],
                       "image": TRAINER_IMAGE}
        helm("install", release, str(previous_release.chart), "--namespace", namespace,
             "-f", str(values_for(previous_release.chart, trainer=old_trainer)), "--wait", "--timeout", "180s")
        old_pod = kubectl.items("pods", f"app.kubernetes.io/instance={release}")[0]
        assert _image_ref(old_pod) == f"docker.io/library/{previous_release.operator_image}"
        leads(old_pod["metadata"]["name"])

        # The quickstart, on the real node; data where the `data` PV points.
        data_dir, models_dir = volume_dirs(kubectl.kubeconfig, namespace)
        shutil.copy(REPO / "examples" / "data" / "quickstart.jsonl", data_dir)
        job = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
        job["spec"]["nodePool"] = {"provisioner": "existing", **local_node.placement}
        # A quarter of the quickstart's steps: enough for the loss to fall (`make demo` runs it all).
        job["spec"]["training"]["maxSteps"] = 16
        kubectl.apply(job)

        def trainer_running() -> dict | None:
            pods = kubectl.items("pods", "finetune.ai/job=quickstart")
            running = [p for p in pods if p.get("status", {}).get("phase") == "Running"
                       and (p["status"].get("containerStatuses") or [{}])[0].get("containerID")]
            return running[0] if running and (kubectl.get("ftj", "quickstart").get("status") or {}).get("phase") == "Running" else None
        trainer_before = wait_for(trainer_running, 180, interval=1, what="the old operator to start the trainer")
        # Held still (cgroup freezer) across the upgrade, so it is surely mid-run when the new
        # operator takes over, however fast the machine.
        containerd_task(kubectl.kubeconfig, trainer_before, "pause")
        paused = trainer_before

        # The upgrade, as docs/install.md gives it: the CRDs first, then the release.
        cluster("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        assert _crd_epochs(cluster).get("x-kubernetes-int-or-string") is True
        helm("upgrade", release, str(CHART), "--namespace", namespace, "-f", str(values_for(CHART)),
             "--wait", "--timeout", "180s")
        pod = wait_for(lambda: (ps := [p for p in kubectl.items("pods", f"app.kubernetes.io/instance={release}")
                                       if p["metadata"]["name"] != old_pod["metadata"]["name"]]) and ps[0], 60,
                       what="the new operator pod")
        name = pod["metadata"]["name"]
        leads(name)
        pod = kubectl.get("pod", name)
        containerd_task(kubectl.kubeconfig, trainer_before, "resume")
        paused = None
        assert pod["spec"]["nodeName"] == local_node.name
        assert pod["spec"]["serviceAccountName"] == fullname
        # The operator image, run by containerd on the real node.
        assert _image_ref(pod) == f"docker.io/library/{OPERATOR_IMAGE}"
        assert local_node.node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
        assert kubectl.get("service", fullname)["spec"]["clusterIP"] == cluster_ip
        # The chart's securityContext, in effect (kubectl exec: API server -> kubelet -> runc).
        whoami = kubectl("exec", name, "--", "id", "-u").stdout.strip()
        assert whoami == "10001"
        write = kubectl("exec", name, "--", "python", "-c", "open('/probe', 'w')", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        # It watches only `namespace`: a FineTuneJob anywhere else is refused at apply time,
        # saying why, rather than accepted and never run.
        def elsewhere() -> str:
            proc = cluster("create", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(VALID), check=False)
            return proc.stdout + proc.stderr
        refused = wait_for(lambda: (said := elsewhere()) and "would never run" in said and said, 30,
                           what="the watched-namespaces policy to take effect")
        assert f"watches only namespaces {namespace}; a FineTuneJob in default would never run" in refused

        # Users, through the built-in roles the chart aggregates into: their own jobs, Models
        # read-only, no status (so no forged Model or progress).
        kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice")
        kubectl("create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob")

        def can(user: str, *what: str) -> bool:
            return kubectl("auth", "can-i", *what, "--as", user, check=False).stdout.strip() == "yes"
        wait_for(lambda: can("alice", "create", "finetunejobs.finetune.ai"), 30, what="the edit role to aggregate")
        assert can("alice", "delete", "finetunejobs.finetune.ai") and can("alice", "get", "models.finetune.ai")
        assert not can("alice", "create", "models.finetune.ai") and not can("alice", "update", "models.finetune.ai")
        assert not can("alice", "patch", "finetunejobs.finetune.ai", "--subresource=status")
        assert not can("alice", "patch", "models.finetune.ai", "--subresource=status")
        wait_for(lambda: can("bob", "get", "finetunejobs.finetune.ai"), 30, what="the view role to aggregate")
        assert can("bob", "list", "models.finetune.ai") and not can("bob", "create", "finetunejobs.finetune.ai")

        def finished() -> dict | None:
            ftj = kubectl.get("ftj", "quickstart")
            return ftj if ftj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None
        ftj = wait_for(finished, 480, interval=2, what="the quickstart job to finish")
        assert ftj["status"]["phase"] == "Succeeded", json.dumps(ftj["status"], indent=1)

        model = wait_for(lambda: (m := kubectl.get("model", "quickstart")) and m.get("status", {}).get("phase") == "Ready" and m,
                         60, what="the Model to be Ready")
        adapter = models_dir / "quickstart" / "adapter_model.safetensors"
        assert model["spec"]["adapter"]["sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
        # The Model the operator published is the model.yaml the trainer wrote (one renderer).
        manifest = yaml.safe_load((models_dir / "quickstart" / "model.yaml").read_text())
        assert manifest["spec"] == model["spec"] and manifest["status"]["metrics"] == model["status"]["metrics"]
        # How it ran, on the Model: a CPU run, no compile, no fused loss, nothing recomputed.
        plan = model["spec"]["runPlan"]
        assert (plan["device"], plan["compile"], plan["fusedLoss"], plan["checkpointedLayers"]) == ("cpu", False, False, 0)
        metrics = json.loads((models_dir / "quickstart" / "result.json").read_text())["metrics"]
        assert metrics["evalLoss"] < metrics["initialEvalLoss"]
        # The trainer ran from the trainer image on the real node, as build_job's non-root user
        # (the output files are that user's).
        trainer = kubectl.items("pods", "finetune.ai/job=quickstart")[0]
        # The pod the old operator started ran to the end through the upgrade: never restarted.
        assert trainer["metadata"]["uid"] == trainer_before["metadata"]["uid"]
        assert trainer["status"]["containerStatuses"][0]["restartCount"] == 0
        # What the trainer chose (here the spec fixed both), in the job's status.
        assert (ftj["status"]["progress"]["globalBatchSize"], ftj["status"]["progress"]["epochs"]) == (8, 3)
        assert trainer["spec"]["nodeName"] == local_node.name
        assert _image_ref(trainer) == f"docker.io/library/{TRAINER_IMAGE}"
        assert adapter.stat().st_uid == 1000
        # Live progress reached the operator through its Service's address.
        assert ftj["status"]["progress"]["step"] == ftj["status"]["progress"]["totalSteps"]
        operator_log = kubectl("logs", name).stdout
        assert "login_with_service_account" not in operator_log and "Traceback" not in operator_log
        assert f"{namespace}/quickstart" in operator_log
        # It survived the whole run with its read-only root filesystem.
        operator_pod = kubectl.get("pod", name)
        assert operator_pod["status"]["containerStatuses"][0]["restartCount"] == 0

        # kubectl finetune against the cluster
        plugin = [str(VENV_BIN / "kubectl-finetune")]
        env = {"KUBECONFIG": kubectl.kubeconfig, "PATH": f"{VENV_BIN}:/usr/bin:/bin"}

        def finetune(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(plugin + list(args), capture_output=True, text=True, env=env, timeout=60)
        listed = finetune("list", "-n", namespace)
        assert listed.returncode == 0 and "quickstart" in listed.stdout and "Succeeded" in listed.stdout, listed
        status = finetune("status", "quickstart", "-n", namespace)
        assert status.returncode == 0 and "quickstart: Succeeded" in status.stdout and "model: quickstart" in status.stdout
        watch = finetune("watch", "quickstart", "-n", namespace)
        assert watch.returncode == 0 and "100%" in watch.stdout, watch
        logs = finetune("logs", "quickstart", "-n", namespace, "--tail", "20")
        assert logs.returncode == 0 and "FINETUNE_PROGRESS" in logs.stdout, logs
        # Following a pod whose container has exited streams what it wrote, then ends.
        followed = finetune("logs", "quickstart", "-n", namespace, "-f")
        assert followed.returncode == 0 and followed.stdout.count("FINETUNE_PROGRESS") >= 16, followed
        missing = finetune("status", "nope", "-n", namespace)
        assert missing.returncode == 1 and missing.stderr.strip() == f'error: finetunejob "nope" not found in namespace "{namespace}"'
        assert "Traceback" not in missing.stderr
    finally:
        if paused is not None:
            containerd_task(kubectl.kubeconfig, paused, "resume")
        _released(helm, release, namespace)
        # The next tests need this tree's CRDs, whatever happened above.
        cluster("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))

    # Helm keeps CRDs (and the namespace it was given); nothing of the release is left, and
    # its namespace policy no longer refuses jobs elsewhere (the next tests create them).
    wait_for(lambda: "created (server dry run)" in elsewhere(), 60, what="the watched-namespaces policy to go")
    wait_for(lambda: not kubectl.items(RELEASE_KINDS, f"app.kubernetes.io/instance={release}"), 60,
             what="the release's objects to go")
    leftover = cluster("get", "clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={release}",
                       "-o", "name").stdout
    assert leftover == ""
    assert not [p for p in kubectl.items("pods") if p["metadata"]["name"].startswith(fullname)]
    assert cluster.get("crd", "finetunejobs.finetune.ai") and cluster.get("crd", "models.finetune.ai")
    # The operator's leader-election Lease is runtime state, not a chart object (as with
    # controller-runtime operators): uninstall deletes the ServiceAccount with the pod, so the
    # stopping operator cannot hand it back (401); it simply expires.
    lease = kubectl.get("lease", fullname)
    assert lease is None or "app.kubernetes.io/instance" not in (lease["metadata"].get("labels") or {})


def test_network_policy_admits_only_trainer_pods_to_the_progress_port(helm, namespace: str) -> None:
    from finetune_operator import naming
    from finetune_operator.api import FineTuneJob

    def policy(*values: str) -> dict | None:
        docs = _docs(helm("template", "v", str(CHART), "--namespace", namespace, *values).stdout)
        return next((d for d in docs if d["kind"] == "NetworkPolicy"), None)

    rules = {rule["ports"][0]["port"]: rule for rule in policy()["spec"]["ingress"]}
    assert set(rules) == {"health", "metrics", "progress"}
    assert "from" not in rules["health"]  # the kubelet's probes come from the node
    (peer,) = rules["progress"]["from"]
    job = FineTuneJob.model_validate({"metadata": {"name": "demo", "namespace": "team-a", "uid": "u"}, "spec": {
        "baseModel": {"source": "preset://tiny-llama"}, "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"destination": "pvc://models/demo"}}})
    trainer_pod_labels = naming.labels(job)
    # The policy's selector is the trainer pods' labels (set in naming.labels), and only theirs:
    # a Model's component label, or any other pod of the operator's, does not match.
    assert peer["podSelector"]["matchLabels"].items() <= trainer_pod_labels.items()
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert peer["namespaceSelector"] == {}
    scoped = policy("--set", "watchNamespaces={team-a,team-b}")
    progress = next(r for r in scoped["spec"]["ingress"] if r["ports"][0]["port"] == "progress")
    assert progress["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    assert "progress" not in {r["ports"][0]["port"] for r in policy("--set", "progress.enabled=false")["spec"]["ingress"]}
    assert policy("--set", "networkPolicy.enabled=false") is None


def test_admission_policy_pins_what_the_operator_may_create(helm, kubectl: Kubectl, namespace: str) -> None:
    """RBAC lets the operator create any Job anywhere; the chart's policies, bound to its
    ServiceAccount, let through only what the operator builds."""
    from finetune_operator import children
    from finetune_operator.api import FineTuneJob
    from finetune_operator.settings import OperatorSettings

    release = f"vap{uuid.uuid4().hex[:6]}"
    docs = _docs(helm("template", release, str(CHART), "--namespace", namespace).stdout)
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
             "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    installed = [d for d in docs if d["kind"] in kinds]
    deployment = next(d for d in _docs(helm("template", release, str(CHART), "--namespace", namespace).stdout)
                      if d["kind"] == "Deployment")
    trainer_image = next(e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                         if e["name"] == "FINETUNE_TRAINER_IMAGE")
    cluster = Kubectl(kubectl.kubeconfig)
    sa = next(d for d in installed if d["kind"] == "ServiceAccount")["metadata"]["name"]
    as_operator = ["--as", f"system:serviceaccount:{namespace}:{sa}"]
    try:
        for doc in installed:
            cluster.apply(doc)
        job = FineTuneJob.model_validate({"apiVersion": "finetune.ai/v1alpha1", "kind": "FineTuneJob",
                                          "metadata": {"name": "demo", "namespace": namespace, "uid": str(uuid.uuid4())},
                                          "spec": {"baseModel": {"source": "preset://tiny-llama"},
                                                   "dataset": {"source": "pvc://data/train.jsonl"},
                                                   "output": {"destination": "pvc://models/demo"}}})
        built = children.build_job(job, OperatorSettings(trainer_image=trainer_image, progress_url="http://x:8082"))
        config = children.build_config_map(job, OperatorSettings(trainer_image=trainer_image))

        def server_says(obj: dict, where: str = namespace) -> str:
            proc = cluster("create", "--dry-run=server", "-n", where, "-f", "-", *as_operator,
                           input=json.dumps(obj), check=False)
            return proc.stdout + proc.stderr

        escape = json.loads(json.dumps(built))
        escape["metadata"]["namespace"] = "kube-system"
        pod = escape["spec"]["template"]["spec"]
        pod["volumes"].append({"name": "root", "hostPath": {"path": "/"}})
        pod["containers"][0]["volumeMounts"].append({"name": "root", "mountPath": "/host"})
        # Each policy takes effect a moment after it is created, each on its own clock: wait for both.
        unowned = {**config, "metadata": {"name": "unowned", "namespace": namespace}}
        wait_for(lambda: "a FineTuneJob controls" in server_says(unowned), 30, what="the children policy to take effect")
        wait_for(lambda: "no hostPath" in server_says(escape, "kube-system"), 30, what="the trainer-jobs policy to take effect")
        assert "created (server dry run)" in server_says(built)
        assert "created (server dry run)" in server_says(config)
        assert "created (server dry run)" in server_says(children.build_network_policy(job))
        # A Model outlives its job (no ownerReference) but must name it, in its lineage and label.
        from finetune_operator.model import model_to_validate
        model = model_to_validate(job)
        assert "ownerReferences" not in model["metadata"]
        assert "created (server dry run)" in server_says(model)
        for break_it in (lambda m: m["metadata"]["labels"].update({"finetune.ai/job": "other"}),
                         lambda m: m["spec"]["sourceJob"].update(uid="")):
            nameless = json.loads(json.dumps(model))
            break_it(nameless)
            assert "Models that name their FineTuneJob" in server_says(nameless)

        other_image = json.loads(json.dumps(built))
        other_image["spec"]["template"]["spec"]["containers"][0]["image"] = "busybox"
        assert "trainer image" in server_says(other_image)
        host_pid = json.loads(json.dumps(built))
        host_pid["spec"]["template"]["spec"]["hostPID"] = True
        assert "without the node's namespaces" in server_says(host_pid)
        escalating = json.loads(json.dumps(built))
        del escalating["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
        assert "unprivileged" in server_says(escalating)
        # Everyone else is untouched: the same hostPath Job as the cluster admin passes.
        proc = cluster("create", "--dry-run=server", "-n", "kube-system", "-f", "-", input=json.dumps(escape), check=False)
        assert proc.returncode == 0, proc.stderr
    finally:
        for doc in installed:
            scope = ["-n", namespace] if doc["kind"] in ("ServiceAccount", "Role", "RoleBinding") else []
            cluster("delete", doc["kind"], doc["metadata"]["name"], *scope, "--wait=false", check=False)


@pytest.mark.parametrize("values,says", [
    (["--set", "provisioner=bogus"], "provisioner"),
    (["--set", "watchNamespaces=team-a"], "watchNamespaces"),
    (["--set", "watchNamespaces={Team_A}"], "watchNamespaces"),
    (["--set", "replicaCont=2"], "replicaCont"),
    (["--set", "trainer.runAsUser=0"], "runAsUser"),
    (["--set-json", 'trainer.pod={"env":[{"name":"NCCL_DEBUG","value":"INFO"}],"sidecars":true}'], "sidecars"),
    (["--set-json", 'trainer.pod={"priorityClassName":"High"}'], "priorityClassName"),
], ids=["provisioner", "namespaces-as-string", "namespace-not-a-label", "typo", "root", "pod-unknown-field", "pod-bad-name"])
def test_values_the_schema_refuses_fail_before_anything_renders(helm, values: list[str], says: str) -> None:
    proc = helm("template", "v", str(CHART), *values, check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert says in proc.stderr, proc.stderr


@pytest.mark.parametrize("values,says", [
    (["--set", "provisioner=karpenter"], "karpenter.enabled is false"),
    (["--set", "provisioner=karpenter", "--set", "karpenter.enabled=true"], "karpenter.nodeClassRef is empty"),
    (["--set", "podDisruptionBudget.enabled=true"], "needs replicaCount of 2 or more"),
], ids=["karpenter-disabled", "no-node-class", "pdb-one-replica"])
def test_values_that_cannot_work_together_fail_with_the_fix(helm, values: list[str], says: str) -> None:
    proc = helm("template", "v", str(CHART), *values, check=False)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


def test_trainer_pod_defaults_reach_the_operators_settings_and_the_operator_pod_takes_its_extras(helm) -> None:
    from finetune_operator.settings import OperatorSettings

    pod_defaults = {"imagePullSecrets": ["regcred"], "priorityClassName": "training",
                    "annotations": {"sidecar.istio.io/inject": "false"},
                    "env": [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"}]}
    docs = _docs(helm("template", "v", str(CHART), "--set-json", f"trainer.pod={json.dumps(pod_defaults)}",
                      "--set", "trainer.runAsUser=null", "--set", "replicaCount=2", "--set", "podDisruptionBudget.enabled=true",
                      "--set", "priorityClassName=system-cluster-critical", "--set", "podLabels.team=ml",
                      "--set", "serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=op@p.iam",
                      "--set-json", 'extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]').stdout)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # What the operator reads at startup is what the chart was given, in the API's own schema.
    settings = OperatorSettings(**{k.removeprefix("FINETUNE_").lower(): v for k, v in env.items()
                                   if k in ("FINETUNE_TRAINER_POD", "FINETUNE_TRAINER_RUN_AS_USER")})
    assert settings.trainer_pod.to_wire() == pod_defaults and settings.trainer_run_as_user is None
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical" and pod["metadata"]["labels"]["team"] == "ml"
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "op@p.iam"}
    budget = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_default_images_are_where_the_release_workflow_pushes_them_tagged_with_the_chart_version(helm) -> None:
    from finetune_operator import __version__

    def images(*values: str) -> tuple[str, str]:
        docs = _docs(helm("template", "v", str(CHART), *values).stdout)
        container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy" and "trainer image" in json.dumps(d))
        # The admission policy pins the same trainer image the operator is told to run.
        assert env["FINETUNE_TRAINER_IMAGE"] in json.dumps(policy)
        return container["image"], env["FINETUNE_TRAINER_IMAGE"]

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    registry = workflow["env"]["REGISTRY"]
    assert images() == (f"{registry}/finetune-operator:{__version__}", f"{registry}/finetune-trainer:{__version__}")
    assert images("--set", "image.tag=9.9.9", "--set", "trainer.tag=9.9.9") == (
        f"{registry}/finetune-operator:9.9.9", f"{registry}/finetune-trainer:9.9.9")
    pinned = f"mirror.example/ml/finetune-trainer:{__version__}@sha256:{'a' * 64}"
    assert images("--set", f"trainer.image={pinned}")[1] == pinned
    assert images("-f", str(LOCAL_NODE_VALUES)) == (OPERATOR_IMAGE, TRAINER_IMAGE)
