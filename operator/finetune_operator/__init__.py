"""finetune-operator: turns FineTuneJob manifests into fine-tuned, published Models."""

__version__ = "0.1.0"
