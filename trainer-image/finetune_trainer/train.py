"""The training run, top to bottom.

  0. claim output.dir for this job (ownership.py: another job's directory is refused untouched)
  1. read and validate the dataset (fails fast, before any model is loaded)
  2. join the process group (torchrun env, or a group of one)
  3. load the base model's tokenizer; tokenize, split, pack
  4. plan the run (planning.py): choose how the model is built (attention, fused LM head + loss,
     checkpointing, torch.compile), build it (with the method's wrapper: LoRA / QLoRA / DoRA /
     full), then the rest of the plan (checkpointed layers, DeepSpeed config); log it once
  5. build the DeepSpeed engine (ZeRO 0-3, offload) from the plan's config
  6. resume from the latest complete checkpoint, if any
  7. train: optimizer steps, progress, checkpoints, SIGTERM -> checkpoint and exit 143
  8. evaluate, save weights + tokenizer, write model.yaml, write result.json last
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_trainer import data, ownership
from finetune_trainer.checkpoint_integrity import load_key as load_checkpoint_key
from finetune_trainer.config import JobConfig
from finetune_trainer.errors import ConfigError, TrainingDiverged
from finetune_trainer.protocol import MODEL_MANIFEST_FILE, RESULT_FILE
from finetune_trainer.run_plan import RunPlan, RunPlanOverrides

if TYPE_CHECKING:
    from finetune_trainer.batching import Row  # torch: imported only once the data is read

log = logging.getLogger(__name__)

RECENT_LOSS_WINDOW = 10  # trainLoss in result.json is the mean over the last steps


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved (when there was progress to save)."""


class StopRequest:
    """Remembers a SIGTERM so the loop can finish its step, checkpoint and leave cleanly.

    Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs; torchrun
    forwards the SIGTERM to every worker.
    """

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM received: checkpointing after the current step, then exiting")
        self.requested = True


def run(config: JobConfig, overrides: RunPlanOverrides | None = None) -> RunPlan:
    """Train, save and write result.json; returns the plan the run followed. `overrides` replace
    the trainer's own runtime choices (the benchmark's variants); a job never sets them."""
    overrides = overrides or RunPlanOverrides()
    stop = StopRequest()
    output_dir = Path(config.output.dir)
    if os.environ.get("RANK", "0") == "0":
        # Before anything in output.dir is touched: it is this job's, or the run stops here
        # (DestinationInUse) and leaves another job's outputs and checkpoints as they are.
        ownership.claim(output_dir, config.job_name, config.job_uid)
        # A result.json left by an earlier attempt must never outlive a failure of this one.
        clear_stale_results(output_dir)

    # 1. The dataset, before anything slow.
    records, fmt, skipped_lines = data.read_examples(config.dataset)
    log.info("dataset %s: %d examples, format %s", config.dataset.path, len(records), fmt)
    # The job's checkpoint key, also before anything slow: checkpoints are resumed only if
    # signed with it, and saved signed with it (checkpoint_integrity).
    checkpoint_key = load_checkpoint_key(config.checkpointing.key_file, config.checkpointing.key_sha256)

    import torch
    import transformers

    from finetune_trainer import activation_memory, adapters, attention, batching, checkpointing, compiling
    from finetune_trainer import distributed, engine as engines, fused_loss, model_loading, outputs, planning
    from finetune_trainer.reporting import Reporter

    # 2. Processes.
    dist = distributed.setup()
    if config.method.type == "qlora" and dist.device.type != "cuda":
        raise ConfigError(
            "method.type: qlora needs a CUDA GPU (bitsandbytes NF4 kernels) and this node has none; "
            "use lora on CPU"
        )
    reporter = Reporter(config.reporting, dist.is_main)
    try:
        # 3. Tokenizer and data. On each node local rank 0 fetches hub files first, so the
        #    other processes find them in the cache instead of downloading them again.
        if dist.is_local_main:
            model_dir = model_loading.resolve_model_dir(config.base_model)
        distributed.barrier()
        if not dist.is_local_main:
            model_dir = model_loading.resolve_model_dir(config.base_model)
        tokenizer = model_loading.load_tokenizer(config.base_model, model_dir)
        if fmt == "chat" and not tokenizer.chat_template:
            raise ConfigError(f"dataset.format: chat data needs a chat template, and {config.base_model.source} has none")
        training = config.training
        sequences = data.tokenize_all(records, fmt, tokenizer, training.max_seq_length)
        train_sequences, validation_sequences = data.split(sequences, config.dataset.validation_split, training.seed)
        train_rows = data.pack_rows(train_sequences, training.max_seq_length, training.packing, training.seed)
        validation_rows = data.pack_rows(validation_sequences, training.max_seq_length, training.packing, training.seed)
        steps = batching.StepPlan.for_rows(training, len(train_rows), dist.world_size)
        steps.validate()
        log.info(
            "%d train rows (%d sequences), %d validation rows; %d steps (%d epochs) of %d rows "
            "(%d micro-batches x %d processes x %d accumulation)",
            len(train_rows), len(train_sequences), len(validation_rows), steps.total_steps, steps.epochs,
            steps.global_batch_size, training.micro_batch_size, dist.world_size, steps.accumulation_steps,
        )

        # 4. The run plan and the model it describes. The job seed fixes adapter init and dropout.
        built = planning.choose_model(config, dist.device, overrides)
        transformers.set_seed(training.seed)
        model = model_loading.load_model(config.base_model, model_dir, config.method, dist.device, built.attention)
        model.name_or_path = config.base_model.source  # PEFT records it in adapter_config.json
        # Before PEFT wraps the model, and before the memory probe. Liger does not cover every
        # architecture; the plan records what ran.
        if built.fused_loss and not fused_loss.apply(model):
            built = dataclasses.replace(built, fused_loss=False)
        model = adapters.prepare_for_training(model, config.method, enable_checkpointing=built.checkpointing)
        engines.cast_like_engine(model, dist.device)
        if built.compile:
            compiling.compile_decoder_layers(model)
        collate = batching.Collator(tokenizer, training.packing, flatten=attention.flattens(built.attention))
        # After compiling (compiled layers keep fewer activations), before the engine (the
        # memory probe runs plain forward/backward passes).
        plan = planning.plan_run(
            config, dist, steps, built, model, collate, [batching.count_tokens([row]) for row in train_rows], overrides
        )
        activation_memory.set_checkpointed_layers(model, plan.checkpointed_layers)
        log.info("run plan: %s", plan.model_dump_json(by_alias=True))

        # 5. Engine.
        engine = engines.build_engine(model, plan.deepspeed, config, steps)

        # 6. Resume.
        checkpoint_root = config.checkpoint_dir
        checkpointing.clear_incomplete(checkpoint_root, dist.is_main)
        fingerprint = checkpointing.config_fingerprint(config, dist.world_size, data.dataset_digest(config.dataset))
        state = checkpointing.load_latest(engine, checkpoint_root, fingerprint, dist, checkpoint_key) or {
            "fingerprint": fingerprint,
            "step": 0,
            "tokensSeen": 0,
            "initialEvalLoss": None,
            "recentLosses": [],
        }

        def evaluate() -> float | None:
            if not validation_rows:
                return None
            return _evaluate(engine, validation_rows, collate, dist, training.micro_batch_size)

        if state["step"] == 0:
            state["initialEvalLoss"] = evaluate()
            if state["initialEvalLoss"] is not None:
                reporter.evaluated(0, state["initialEvalLoss"])
        reporter.started(
            steps.total_steps, state["step"], resumed=state["step"] > 0,
            examples=len(records), skippedLines=skipped_lines, worldSize=dist.world_size,
            checkpointedLayers=plan.checkpointed_layers, global_batch_size=steps.global_batch_size, epochs=steps.epochs,
        )

        # 7. Train.
        step = state["step"]
        last_saved_step = step
        run_start, steps_this_run = time.perf_counter(), 0
        while step < steps.total_steps:
            step_start = time.perf_counter()
            micro_batches = [[train_rows[i] for i in indices] for indices in steps.micro_batches(step, dist.rank)]
            # Every process holds all rows and the same plan, so each counts the whole step's
            # targets (all processes' micro-batches) itself.
            step_targets = batching.count_targets([train_rows[i] for i in steps.step_rows(step)])
            loss_sum = train_step(engine, micro_batches, step_targets, collate, dist)
            tokens = sum(batching.count_tokens(rows) for rows in micro_batches)
            step += 1
            steps_this_run += 1
            loss_sum, step_tokens, stop_votes = distributed.all_reduce_sum(
                [loss_sum, tokens, float(stop.requested)], dist.device
            )
            step_loss = loss_sum / step_targets
            check_finite(step, step_loss, engine.get_global_grad_norm(), training.learning_rate)
            state["step"] = step
            state["tokensSeen"] += int(step_tokens)
            state["recentLosses"] = (state["recentLosses"] + [step_loss])[-RECENT_LOSS_WINDOW:]
            elapsed = time.perf_counter() - run_start
            reporter.step(
                step=step,
                total_steps=steps.total_steps,
                epoch=steps.epoch_of(step - 1),
                loss=step_loss,
                learning_rate=engine.get_lr()[0],
                tokens=int(step_tokens),
                tokens_seen=state["tokensSeen"],
                step_seconds=time.perf_counter() - step_start,
                eta_seconds=elapsed / steps_this_run * (steps.total_steps - step),
                gpu_memory=torch.cuda.max_memory_allocated() if dist.device.type == "cuda" else None,
            )
            checkpoint_due = step % config.checkpointing.every_steps == 0 and step < steps.total_steps
            if checkpoint_due or (stop_votes and step > last_saved_step):
                path = checkpointing.save(engine, checkpoint_root, step, state, config.checkpointing.keep, dist,
                                          checkpoint_key)
                last_saved_step = step
                reporter.emit({"event": "checkpoint", "step": step, "path": str(path)})
            if stop_votes:
                reporter.emit({"event": "preempted", "step": step})
                raise Preempted(f"stopped by SIGTERM at step {step}/{steps.total_steps}; checkpoint saved, rerun to resume")

        # 8. Evaluate and save.
        eval_loss = evaluate()
        if eval_loss is not None:
            reporter.evaluated(step, eval_loss)
        engine.empty_partition_cache()  # see _evaluate
        staging = output_dir / f".staging-{time.time_ns()}"
        outputs.save_weights(engine.module, tokenizer, not config.method.uses_adapter, staging, dist.is_main,
                             config.base_model)
        if dist.is_main:
            names = outputs.publish_staged(staging, output_dir)
            recent = state["recentLosses"]
            metrics = {
                "trainLoss": sum(recent) / len(recent) if recent else None,
                "evalLoss": eval_loss,
                "initialEvalLoss": state["initialEvalLoss"],
                "steps": step,
                "tokens": state["tokensSeen"],
                "skippedLines": skipped_lines,
            }
            outputs.write_results(config, output_dir, names, metrics, dist.world, run_plan=plan)
            reporter.emit({"event": "finished", "step": step, "metrics": metrics})
            log.info("done: %s", metrics)
        distributed.barrier()
        return plan
    finally:
        reporter.close()
        distributed.teardown()


def train_step(engine, micro_batches: list[list[Row]], step_targets: int, collate, dist) -> float:
    """One optimizer step over this process's micro-batches; returns their summed per-target-token
    loss (a float: one host sync per step, not one per micro-batch).

    The step's loss is the mean over every target token of the step, on every process: the sum of
    the per-token losses over all micro-batches divided by `step_targets`, the same estimator as
    the eval loss. Its gradient is what backward must produce. The model's loss is a mean over one
    micro-batch's targets, so times that micro-batch's target count it is the micro-batch's sum.
    DeepSpeed then divides each backward's loss by the accumulation steps and averages the
    gradients over the processes; scaling the sum by accumulation x processes / step_targets
    undoes both, leaving d(step loss)/d(weights).

    A mean of micro-batch means would weigh a target token in a short micro-batch more than one in
    a long micro-batch. Weighted by tokens, each target counts the same, so a step whose
    micro-batches hold equal target counts gets the gradient it got before, and one whose
    micro-batches differ shifts weight toward the longer ones: its effective learning rate per
    token changes, not the learning rate of the step as a whole.
    """
    import torch

    from finetune_trainer import batching

    scale = len(micro_batches) * dist.world_size / step_targets
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for rows in micro_batches:
        summed = engine(**collate(rows, dist.device)).loss * batching.count_targets(rows)
        engine.backward(summed * scale)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary
        loss_sum += summed.detach()
    return loss_sum.item()


def check_finite(step: int, loss: float, grad_norm, learning_rate: float) -> None:
    """Fail a diverged run before it saves anything; the checkpoints before it stay.

    DeepSpeed's own bf16 overflow check is off (engine.py says why), so this is where a
    loss or gradient norm that is no longer a number stops the run. Every process sees the
    same all-reduced loss and global norm, so all of them stop at the same step."""
    norm = None if grad_norm is None else float(grad_norm)
    # DeepSpeed reports a NaN or infinite gradient norm as -1.
    bad_norm = norm is not None and not (math.isfinite(norm) and norm >= 0)
    if not math.isfinite(loss) or bad_norm:
        raise TrainingDiverged(
            f"training diverged at step {step}: loss {loss}, gradient norm {norm}; "
            f"lower training.learningRate (now {learning_rate:g}) and rerun"
        )


def clear_stale_results(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_FILE, RESULT_FILE + ".tmp", MODEL_MANIFEST_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for staging in output_dir.glob(".staging-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _evaluate(engine, rows, collate, dist, micro_batch_size: int) -> float:
    """Mean loss per target token over the validation rows, across all processes.

    Each process takes every world_size-th row. All processes run the same number of forward
    passes (ZeRO-3 gathers parameters collectively); a process out of rows repeats one with
    weight zero.
    """
    import torch

    from finetune_trainer import batching, distributed

    engine.eval()
    mine = rows[dist.rank :: dist.world_size]
    per_process = math.ceil(len(rows) / dist.world_size)
    loss_sum = targets_sum = 0.0
    with torch.no_grad():
        for start in range(0, per_process, micro_batch_size):
            batch_rows = mine[start : start + micro_batch_size]
            weight = 1.0
            if not batch_rows:
                batch_rows, weight = rows[:1], 0.0
            loss = engine(**collate(batch_rows, dist.device)).loss
            targets = batching.count_targets(batch_rows)
            loss_sum += weight * loss.item() * targets
            targets_sum += weight * targets
    # ZeRO-3 prefetches the parameters of the module it expects next; after the last eval
    # batch some are still being gathered ("in flight"), and the next gather or save would
    # fail on them. This waits for them and re-partitions everything (a no-op below stage 3).
    engine.empty_partition_cache()
    engine.train()
    loss_sum, targets_sum = distributed.all_reduce_sum([loss_sum, targets_sum], dist.device)
    return loss_sum / targets_sum
