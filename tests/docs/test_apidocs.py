"""docs/api.md is generated from the CRD schemas; it must match what `make docs` writes."""

from __future__ import annotations

from finetune_operator import apidocs


def test_api_reference_is_current() -> None:
    assert apidocs.OUTPUT.read_text() == apidocs.render(), "docs/api.md drifted from crds/: run `make docs`"


def test_every_field_is_documented() -> None:
    text = apidocs.render()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Field")]
    assert rows and all(not row.rstrip().endswith("|  |") for row in rows), "a field without a description"
    for section in ("### `spec.dataset`", "### `spec.method.lora`", "### `status.progress`", "## Model"):
        assert section in text
