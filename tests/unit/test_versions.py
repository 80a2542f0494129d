"""One version: pyproject.toml's. The chart's version and appVersion repeat it (Helm reads them
from Chart.yaml, and hack/images.sh tags the images with appVersion), the packages report it."""

from __future__ import annotations

import tomllib

import yaml

from kubetools import REPO


def test_the_chart_and_the_packages_carry_the_distributions_version():
    import finetune_operator
    import finetune_trainer
    from finetune_operator.settings import OperatorSettings

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "charts" / "finetune-operator" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version
    assert finetune_operator.__version__ == finetune_trainer.__version__ == version
    assert OperatorSettings().trainer_image == f"finetune-trainer:{version}"
