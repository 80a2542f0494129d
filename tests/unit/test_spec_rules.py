"""The spec's rules hold in Python exactly as the API server enforces them (tests/integration/
test_api_validation.py runs the same cases through `kubectl apply`): a local run, or the trainer
reading its config, rejects what the API server rejects."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from spec_cases import ACCEPTED, INVALID, QUANTITIES, SERVER_ONLY, VALID, with_changes

from finetune_operator import api, crdgen
from finetune_trainer.config import DistributedConfig

CHECKED_HERE = [c for c in INVALID if c[0] not in SERVER_ONLY]


def parse(manifest: dict) -> api.FineTuneJob:
    return api.FineTuneJob.model_validate({**manifest, "metadata": {**manifest["metadata"], "namespace": "ns"}})


def test_the_valid_spec_parses():
    parse(VALID)


@pytest.mark.parametrize("case,path,value,expected", CHECKED_HERE, ids=[c[0] for c in CHECKED_HERE])
def test_python_rejects_what_the_api_server_rejects(case, path, value, expected):
    with pytest.raises(ValidationError) as caught:
        parse(with_changes(path, value))
    # A rule's Python twin says the rule's own message.
    message = expected.split(": ", 1)[-1] if "Invalid value" not in expected else expected
    if not any(token in expected for token in ("Required value", "Unsupported value", "unknown field", "spec.")):
        assert message in str(caught.value)


@pytest.mark.parametrize("case,path,value", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_python_accepts_what_the_api_server_accepts(case, path, value):
    parse(with_changes(path, value))


@pytest.mark.parametrize("text,accepted", QUANTITIES, ids=[repr(q) for q, _ in QUANTITIES])
def test_quantities_are_read_as_the_api_server_reads_them(text, accepted):
    assert api.POSITIVE_QUANTITY.holds(text) is accepted


# Regex syntax that Go's RE2 (the API server: `pattern`, CEL matches()) and Rust's regex crate
# (pydantic) or Python's re (the twins) read differently: Perl classes (\s is ASCII whitespace in
# RE2, Unicode in Rust), word boundaries, Unicode classes, POSIX classes, flags (case folding).
_DIALECT_TRAPS = re.compile(r"\\[sSwWdDbBpPhHvVRXZAzQE]|\[:|\(\?")


def _regexes(node, where=""):
    """Every regex the CRDs hold: `pattern`s and the arguments of CEL matches()."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern":
                yield where, value
            elif key == "rule":
                for m in re.finditer(r"matches\('([^']*)'\)", value):
                    yield where, m.group(1)
            else:
                yield from _regexes(value, f"{where}.{key}")
    elif isinstance(node, list):
        for item in node:
            yield from _regexes(item, where)


def test_every_pattern_reads_the_same_in_go_and_rust():
    found = [r for crd in (crdgen.finetunejob_crd(), crdgen.model_crd()) for r in _regexes(crd)]
    assert len(found) > 10, found  # the walk finds the patterns at all
    traps = [(where, regex) for where, regex in found if _DIALECT_TRAPS.search(regex) or not regex.isascii()]
    assert not traps, f"patterns with classes the two regex engines read differently; spell them out in ASCII: {traps}"


def test_the_dialect_check_catches_shorthands():
    for regex in (r"^[^\s]+$", r"^\w+$", r"^[\d]$", r"\bx", r"\p{L}", "[[:space:]]", "(?i)abc"):
        assert _DIALECT_TRAPS.search(regex), regex
    for regex in ("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "^(pvc|s3)://[!-~]+$", "(^|/)[.][.](/|$)", "^[a-f0-9]{64}$"):
        assert not _DIALECT_TRAPS.search(regex), regex


def test_section_rules_are_in_the_crd_once_at_their_section():
    spec = crdgen.finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    distributed = spec["properties"]["distributed"]["x-kubernetes-validations"]
    for rule in DistributedConfig.RULES:
        assert rule.to_cel() in distributed
    every_rule = str(spec)
    assert every_rule.count("self.offload != 'parameters'") == 1


# Trainer settings a FineTuneJob does not set directly: the operator derives them from the job's
# URIs, Secrets and its own endpoints.
DERIVED = {"jobName", "jobUid", "baseModel.source", "baseModel.tokenFile", "baseModel.cacheDir", "baseModel.volumeRoot",
           "dataset.path", "dataset.volumeRoot", "output", "checkpointing.dir",
           "checkpointing.keyFile", "checkpointing.keySha256", "reporting", "publish"}


def _leaves(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        if path in DERIVED:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and path.count(".") < 1:
            yield from _leaves(annotation, path + ".")
        else:
            yield path


def test_every_trainer_setting_is_reachable_from_a_finetunejob():
    from finetune_trainer.config import JobConfig

    spec = crdgen.finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = []
    for path in _leaves(JobConfig):
        node = spec
        for part in path.split("."):
            node = node.get("properties", {}).get(part)
            if node is None:
                missing.append(path)
                break
    assert not missing, f"trainer settings a FineTuneJob cannot set: {missing}"
