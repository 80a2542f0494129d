"""finetune-operator: turns FineTuneJob manifests into fine-tuned, published Models."""

from importlib.metadata import version

# The distribution's (pyproject.toml), which the chart's appVersion and the image tags repeat
# (tests/unit/test_versions.py holds them together).
__version__ = version("finetune-operator")
