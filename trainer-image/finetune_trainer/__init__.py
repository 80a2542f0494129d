"""finetune_trainer: the training program inside the trainer image.

This package must stay importable without torch: the operator imports
``finetune_trainer.config`` and ``finetune_trainer.protocol`` to render and read the
trainer's contract. Anything that needs torch lives in modules the operator never imports.
"""

__version__ = "0.1.0"
