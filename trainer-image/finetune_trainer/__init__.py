"""finetune_trainer: the training program inside the trainer image.

This package must stay importable without torch: the operator imports
``finetune_trainer.config`` and ``finetune_trainer.protocol`` to render and read the
trainer's contract. Anything that needs torch lives in modules the operator never imports.
"""

from importlib.metadata import version

__version__ = version("finetune-operator")  # the trainer image installs the same distribution
