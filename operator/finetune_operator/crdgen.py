"""Generate the CustomResourceDefinitions from the pydantic API models.

    python -m finetune_operator.crdgen            # write crds/ and the chart's copy
    python -m finetune_operator.crdgen --check    # exit 1 if a checked-in file drifted

pydantic emits JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 subset. The
conversion inlines $refs, turns Optional[X] into a nullable X, keeps defaults, enums, bounds and
descriptions, and carries the CEL rules attached through json_schema_extra.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from finetune_trainer.config import Rule, int_or_keyword_message
from pydantic import BaseModel

from . import api

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = [REPO_ROOT / "crds", REPO_ROOT / "charts" / "finetune-operator" / "crds"]

# Keys of JSON Schema that a structural OpenAPI v3 schema keeps as they are.
_KEPT = {
    "type", "description", "default", "enum", "pattern", "format", "minimum", "maximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "required", "nullable", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref, letting the referring node's keys (its field description) win."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    overrides = {k: v for k, v in node.items() if k != "$ref"}
    rules = target.get("x-kubernetes-validations", []) + overrides.pop("x-kubernetes-validations", [])
    target.update(overrides)
    if rules:
        target["x-kubernetes-validations"] = rules
    return target


def _one_paragraph_per_line(text: str) -> str:
    """Docstrings wrap at 100 columns; `kubectl explain` reads better with whole paragraphs."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _int_or_keyword(variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`int (with bounds) | Literal["auto"]` as Kubernetes spells it: int-or-string, with a CEL
    rule for the bounds and the keyword (a structural schema has no unions)."""
    ints = [v for v in variants if v.get("type") == "integer"]
    words = [v for v in variants if v.get("type") == "string" and ("const" in v or "enum" in v)]
    if len(ints) != 1 or len(words) != 1 or len(variants) != 2:
        return None
    number, word = ints[0], words[0]
    keywords = [word["const"]] if "const" in word else word["enum"]
    low, high = number.get("minimum"), number.get("maximum")
    bounds = " && ".join(filter(None, (low is not None and f"int(self) >= {low}", high is not None and f"int(self) <= {high}")))
    return {"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [{
        "rule": f"type(self) == string ? self in {keywords!r} : {bounds or 'true'}".replace('"', "'"),
        "message": int_or_keyword_message(low, high, keywords),
    }]}


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node and (special := _int_or_keyword([_resolve(v, defs) for v in node["anyOf"]])):
        node = {**{k: v for k, v in node.items() if k != "anyOf"}, **special}
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express union {node['anyOf']} in a structural schema")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        inner = to_structural(variants[0], defs)
        rules = inner.get("x-kubernetes-validations", []) + outer.pop("x-kubernetes-validations", [])
        inner.update(outer)
        if rules:
            inner["x-kubernetes-validations"] = rules
        inner["nullable"] = True
        if inner.get("default", ...) is None:
            del inner["default"]
        node = inner
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEPT:
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {name: to_structural(prop, defs) for name, prop in value.items()}
            required = set(node.get("required", []))
            for name, prop in out["properties"].items():
                # An omitted optional object still gets its fields' defaults: the API server
                # only defaults inside objects that exist.
                if prop.get("type") == "object" and name not in required and "default" not in prop \
                        and not prop.get("nullable") and "properties" in prop:
                    # Spelled out rather than {}: the API server checks a default against the
                    # object's CEL rules without defaulting inside it first.
                    prop["default"] = _filled_in(prop)
        elif key == "items":
            out["items"] = to_structural(value, defs)
        elif key == "additionalProperties":
            if value is True:
                # Free-form objects say so with x-kubernetes-preserve-unknown-fields instead.
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    raise ValueError(f"a free-form object needs x-kubernetes-preserve-unknown-fields: {node}")
                continue
            out["additionalProperties"] = to_structural(value, defs) if isinstance(value, dict) else value
    if "description" in out:
        out["description"] = _one_paragraph_per_line(out["description"])
    if out.get("format") == "date-time":
        out.pop("default", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" in out and out.get("additionalProperties") is False:
        del out["additionalProperties"]  # structural schemas prune unknown fields anyway
    return out


def _filled_in(schema: dict[str, Any]) -> dict[str, Any]:
    """The value of an omitted object: each of its fields' defaults."""
    return {name: copy.deepcopy(prop["default"]) for name, prop in schema.get("properties", {}).items() if "default" in prop}


def schema_of(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode=mode, ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return to_structural(raw, defs)


def _missing_descriptions(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = []
    for name, prop in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        if here == ".metadata":
            continue
        if not prop.get("description"):
            missing.append(here)
        missing += _missing_descriptions(prop, here)
    if "items" in schema:
        missing += _missing_descriptions(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += _missing_descriptions(schema["additionalProperties"], f"{path}{{}}")
    return missing


def _crd(kind: str, plural: str, short_names: list[str], spec_model, status_model, description: str,
         columns: list[dict[str, Any]], root_rules: list[dict[str, str]]) -> dict[str, Any]:
    spec = schema_of(spec_model)
    status = schema_of(status_model)
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object: finetune.ai/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind of this object: {kind}."},
            # The API server owns metadata's schema and rejects anything but a bare object here.
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    missing = _missing_descriptions(root)
    if missing:
        raise ValueError(f"{kind}: fields without a description: {', '.join(missing)}")
    names = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if short_names:
        names["shortNames"] = short_names
    names["categories"] = ["finetune"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": names,
            "scope": "Namespaced",
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def finetunejob_crd() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent of steps done."},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "description": "Estimated time left."},
        {"name": "Model", "type": "string", "jsonPath": ".status.model", "description": "Published Model.", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "description": "Time since creation."},
    ]
    name_rule = Rule(
        f"self.metadata.name.size() <= {api.MAX_JOB_NAME_LENGTH}",
        f"metadata.name must be at most {api.MAX_JOB_NAME_LENGTH} characters (the operator derives child names from it)",
        reason="FieldValueInvalid",
    ).to_cel()
    # The trainer Job is Indexed: its pods' hostnames are "<job>-trainer-<index>", DNS labels.
    label_rule = Rule(
        f"self.metadata.name.matches('{api.DNS_LABEL}')",
        "metadata.name must be a DNS label (lowercase letters, digits and '-', no dots): "
        "the trainer pods' hostnames are made from it",
        reason="FieldValueInvalid",
    ).to_cel()
    # Several nodes rendezvous through a headless Service named after the job, and a Service's
    # name is a DNS-1035 label: it starts with a letter.
    service_rule = Rule(
        "!has(self.spec.distributed) || !has(self.spec.distributed.nodes) || self.spec.distributed.nodes <= 1"
        " || self.metadata.name.matches('^[a-z]')",
        "metadata.name must start with a letter when distributed.nodes > 1: the pods find each other "
        "through a Service named after the job",
        reason="FieldValueInvalid",
    ).to_cel()
    return _crd("FineTuneJob", "finetunejobs", ["ftj"], api.FineTuneJobSpec, api.FineTuneJobStatus,
                api.FineTuneJob.__doc__, columns, [name_rule, label_rule, service_rule])


def model_crd() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.source", "description": "Base model."},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "description": "Fine-tuning method."},
        {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.metrics.evalLoss", "description": "Final eval loss."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "description": "Time since creation."},
    ]
    return _crd("Model", "models", [], api.ModelSpec, api.ModelStatus, api.Model.__doc__, columns, [])


def rendered() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    header = ("# Generated by `python -m finetune_operator.crdgen` from finetune_operator/api.py and the trainer's\n"
              "# contract types it composes (finetune_trainer.config, model_manifest, run_plan). Do not edit.\n")
    out = {}
    for crd in (finetunejob_crd(), model_crd()):
        name = f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"
        out[name] = header + yaml.safe_dump(crd, sort_keys=False, width=120)
    return out


VALUES_SCHEMA = REPO_ROOT / "charts" / "finetune-operator" / "values.schema.json"


def _json_schema(node: Any) -> Any:
    """A structural schema as plain JSON Schema: Helm ignores CEL, and `nullable` is spelled as
    a null type."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k not in ("x-kubernetes-validations", "nullable")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def values_schema() -> str:
    """The chart's values.schema.json with trainer.pod generated from spec.trainerPod, so the
    chart's defaults and a job's own settings have one schema (the rest is written there)."""
    schema = json.loads(VALUES_SCHEMA.read_text())
    pod = _json_schema(schema_of(api.TrainerPodSpec))
    pod["additionalProperties"] = False
    pod["description"] = "Defaults for every trainer pod (generated from FineTuneJob spec.trainerPod). " + pod["description"]
    schema["properties"]["trainer"]["properties"]["pod"] = pod
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a checked-in CRD differs")
    args = parser.parse_args(argv)
    drifted = []
    for directory in CRD_DIRS:
        for name, text in rendered().items():
            path = directory / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    drifted.append(str(path.relative_to(REPO_ROOT)))
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    values = values_schema()
    if args.check and VALUES_SCHEMA.read_text() != values:
        drifted.append(str(VALUES_SCHEMA.relative_to(REPO_ROOT)))
    elif not args.check:
        VALUES_SCHEMA.write_text(values)
    if drifted:
        print(f"CRDs out of date with api.py: {', '.join(drifted)}; run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
