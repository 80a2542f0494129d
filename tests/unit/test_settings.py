"""Operator settings: read once at startup, JSON chart values as typed values, and a bad value
stops the operator with one clear line instead of failing a user's job later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kopf
import pytest
from factories import make_job

from finetune_operator import handlers, provisioning, settings
from finetune_operator.settings import OperatorSettings

NODE_CLASS = {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"}
CPU_REQ = [{"key": "karpenter.kwok.sh/instance-family", "operator": "In", "values": ["cpu"]}]


@pytest.fixture
def env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(key)
    return lambda **values: [monkeypatch.setenv(settings.ENV_PREFIX + k.upper(), v) for k, v in values.items()]


def test_json_chart_values_become_typed_values(env):
    env(karpenter_node_class=json.dumps(NODE_CLASS), cpu_pool_requirements=json.dumps(CPU_REQ),
        gpu_pool_requirements="", resync_seconds="3")
    loaded = settings.load()
    assert loaded.karpenter_node_class == settings.NodeClassRef(**NODE_CLASS)
    assert [r.to_wire() for r in loaded.cpu_pool_requirements] == CPU_REQ
    assert loaded.gpu_pool_requirements == () and loaded.resync_seconds == 3
    pool = provisioning.build_node_pool(make_job(nodePool={"provisioner": "karpenter"},
                                                 resources={"accelerator": "none"}), loaded)
    assert pool["spec"]["template"]["spec"]["nodeClassRef"] == NODE_CLASS
    assert CPU_REQ[0] in pool["spec"]["template"]["spec"]["requirements"]


@pytest.mark.parametrize(("values", "names"), [
    ({"karpenter_node_class": '{"group": "g", "kind": "K"'},
     ["FINETUNE_KARPENTER_NODE_CLASS (chart value karpenter.nodeClassRef): not valid JSON"]),
    ({"karpenter_node_class": '{"group": "g", "kind": "K"}'}, ["FINETUNE_KARPENTER_NODE_CLASS.name", "Field required"]),
    ({"cpu_pool_requirements": '[{"key": "k", "operator": "Within"}]'},
     ["FINETUNE_CPU_POOL_REQUIREMENTS[0].operator (chart value karpenter.cpuPoolRequirements)"]),
    ({"gpu_pool_requirements": '{"key": "k"}'}, ["FINETUNE_GPU_POOL_REQUIREMENTS"]),
    ({"gpu_pool_requirements": '[{"key": "k", "operator": "In", "vals": []}]'}, ["FINETUNE_GPU_POOL_REQUIREMENTS[0].vals"]),
    ({"resync_seconds": "0"}, ["FINETUNE_RESYNC_SECONDS"]),
    ({"default_provisioner": "karpenter"}, ["no default node class", "FINETUNE_KARPENTER_NODE_CLASS"]),
    ({"karpenter_node_class": "[]", "resync_seconds": "soon"},
     ["FINETUNE_KARPENTER_NODE_CLASS (chart value karpenter.nodeClassRef): ", "; FINETUNE_RESYNC_SECONDS: "]),
])
def test_a_bad_value_is_one_line_naming_it(env, values, names):
    env(**values)
    with pytest.raises(SystemExit) as exc:
        settings.load()
    message = str(exc.value.code)
    assert message.startswith("finetune-operator: invalid settings: ") and "\n" not in message, message
    assert all(name in message for name in names), message


def test_the_operator_exits_at_startup_on_a_bad_value(env, tmp_path):
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith(settings.ENV_PREFIX)}
    proc = subprocess.run([str(Path(sys.executable).parent / "finetune-operator")], capture_output=True, text=True,
                          timeout=60, env={**env_vars, "FINETUNE_CPU_POOL_REQUIREMENTS": "[{key: k}]",
                                           "KUBECONFIG": str(tmp_path / "none")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "finetune-operator: invalid settings: FINETUNE_CPU_POOL_REQUIREMENTS (chart value "
        "karpenter.cpuPoolRequirements): not valid JSON (Expecting property name enclosed in double quotes at character 2)"]


def test_importing_the_handlers_reads_no_settings(env):
    env(resync_seconds="not a number", karpenter_node_class="{")
    code = "import finetune_operator.handlers, finetune_operator.main"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert not any(isinstance(v, OperatorSettings) for v in vars(handlers).values())


def test_the_handlers_read_settings_from_the_memo():
    memo = handlers.make_memo(OperatorSettings(default_provisioner="karpenter", karpenter_node_class=NODE_CLASS))
    assert handlers._uses_karpenter(spec={}, memo=memo)
    assert not handlers._uses_karpenter(spec={"nodePool": {"provisioner": "none"}}, memo=memo)
    assert not handlers._uses_karpenter(spec={}, memo=handlers.make_memo(OperatorSettings(default_provisioner="none")))
    assert len(memo.jobs) == 0


def test_the_resync_timer_takes_its_interval_from_the_settings():
    registry = kopf.OperatorRegistry()
    handlers.register_resync(OperatorSettings(resync_seconds=7).resync_seconds, registry)
    (timer,) = registry._spawning.get_all_handlers()
    assert (timer.id, timer.interval, timer.initial_delay, timer.fn) == ("resync", 7, 7, handlers.resync)
    assert not timer.when(status={"phase": "Failed"}) and timer.when(status={"phase": "Running"})
