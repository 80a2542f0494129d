"""`finetune-trainer --config FILE`: run one fine-tuning job.

Exit codes (finetune_trainer.protocol): 0 done (result.json written), 2 bad config or data
(one line on stderr, no traceback), 3 output.dir belongs to another job (likewise), 143 stopped by SIGTERM after checkpointing, 1 anything
else (with a traceback: that is a bug or an infrastructure failure).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from finetune_trainer import protocol
from finetune_trainer.config import load_config
from finetune_trainer.errors import UserError


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Library chatter drowns the progress lines; keep their warnings.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")


def _fail(message: str, exit_code: int, termination_path: str | None) -> int:
    print(f"{protocol.USER_ERROR_PREFIX}{message}", file=sys.stderr)
    if termination_path and os.environ.get("RANK", "0") == "0":
        from finetune_trainer.outputs import write_termination_message

        # torchrun reports any failed worker as exit code 1; the message keeps the real one.
        write_termination_message(termination_path, protocol.failure_message(message, exit_code))
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-trainer", description="Fine-tune a language model.")
    parser.add_argument("--config", required=True, help="job config file (YAML or JSON)")
    args = parser.parse_args(argv)
    _setup_logging()

    try:
        config = load_config(args.config)
    except UserError as exc:
        return _fail(str(exc), protocol.EXIT_USER_ERROR, None)
    termination_path = config.reporting.termination_message_path

    from finetune_trainer.train import Preempted, run

    try:
        run(config)
    except UserError as exc:
        return _fail(str(exc), exc.exit_code, termination_path)
    except Preempted as exc:
        return _fail(str(exc), protocol.EXIT_PREEMPTED, termination_path)
    except Exception as exc:  # a bug or an infrastructure failure: keep the traceback
        traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc}".splitlines()[0], protocol.EXIT_INTERNAL_ERROR, termination_path)
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
