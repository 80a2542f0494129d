"""The trainer's result as the operator reads it: the contract's own types, re-exported.

Defined once in `finetune_trainer.result` (torch-free); see there for the termination-message
rules. The operator publishes a Model only from a message that parses into `TrainerResult`.
"""

from finetune_trainer.result import InvalidResult, TrainerResult, parse_result

__all__ = ["InvalidResult", "TrainerResult", "parse_result"]
