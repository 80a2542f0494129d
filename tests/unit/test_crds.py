"""The checked-in CRDs are generated from api.py and must not drift."""

import yaml

from finetune_operator import crdgen


def test_checked_in_crds_match_the_models():
    assert crdgen.main(["--check"]) == 0, "run `make crds`"


def test_every_field_is_described_and_structural():
    for text in crdgen.rendered().values():
        crd = yaml.safe_load(text.split("\n", 1)[1])
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

        def walk(node, path):
            # int-or-string is the one typeless node a structural schema allows.
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type (not structural)"
            for forbidden in ("anyOf", "$ref", "allOf", "oneOf", "title"):
                assert forbidden not in node, f"{path}: {forbidden}"
            for name, prop in node.get("properties", {}).items():
                if path == crd["spec"]["names"]["kind"] and name == "metadata":
                    continue  # the API server forbids describing metadata
                assert prop.get("description"), f"{path}.{name}: no description"
                walk(prop, f"{path}.{name}")
            if "items" in node:
                walk(node["items"], f"{path}[]")

        walk(schema, crd["spec"]["names"]["kind"])


def test_short_name_and_status_subresource():
    crd = crdgen.finetunejob_crd()
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
