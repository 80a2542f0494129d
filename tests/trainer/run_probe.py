"""Run in a subprocess (or under torchrun) by test_run_plan.py; prints one `PROBE {json}` line.

  run_probe.py run CONFIG OVERRIDES_JSON   train.run with overrides; records what was built
  run_probe.py gradient WORKDIR            one train.train_step against autograd on the token mean

Recording wraps engine.build_engine and Collator.__call__ and changes nothing they do.
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def run(config_path: str, overrides_json: str) -> dict:
    from finetune_trainer import activation_memory, batching, train
    from finetune_trainer import engine as engines
    from finetune_trainer.config import load_config
    from finetune_trainer.run_plan import RunPlanOverrides

    built: dict = {}
    build_engine, collate = engines.build_engine, batching.Collator.__call__

    def recording_build(model, ds_config, *args):
        engine = build_engine(model, ds_config, *args)
        built["attention"] = model.config._attn_implementation
        built["checkpointed"] = [layer.gradient_checkpointing for layer in activation_memory.checkpointable_layers(model)]
        built["gradientClipping"] = engine.gradient_clipping()
        return engine

    def recording_collate(self, rows, device):
        batch = collate(self, rows, device)
        built.setdefault("flatten", "cu_seq_lens_q" in batch)
        return batch

    engines.build_engine = recording_build
    batching.Collator.__call__ = recording_collate
    plan = train.run(load_config(config_path), RunPlanOverrides.model_validate_json(overrides_json))
    return {"plan": plan.model_dump(by_alias=True, mode="json"), "built": built}


def gradient(workdir: str) -> dict:
    from finetune_trainer import adapters, batching, distributed, planning, presets, train
    from finetune_trainer import engine as engines
    from finetune_trainer.config import JobConfig
    from trainer_helpers import random_sequences

    dist = distributed.setup()
    try:
        world = dist.world_size
        config = JobConfig.model_validate({
            "jobName": "probe", "baseModel": {"source": "preset://tiny-llama"},
            "dataset": {"path": f"{workdir}/unused.jsonl"},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["all-linear"]}},
            "training": {"microBatchSize": 1, "globalBatchSize": 2 * world, "maxSteps": 1, "learningRate": 1e-3},
            "distributed": {"zeroStage": 2},
            "output": {"dir": f"{workdir}/out"},
        })
        steps = batching.StepPlan(num_rows=2 * world, micro_batch_size=1, global_batch_size=2 * world,
                                  world_size=world, epochs=1, max_steps=1, seed=0)
        model, tokenizer = presets.build_preset("tiny-llama", torch.float32, dist.device)
        model = adapters.prepare_for_training(model, config.method, enable_checkpointing=False)
        vocab = model.config.vocab_size
        # Micro-batches of 3 to 70 tokens: their means weigh tokens very differently.
        rows = [random_sequences([length], vocab, seed=i) for i, length in enumerate([3, 70, 11, 45][: 2 * world])]
        collate = batching.Collator(tokenizer, packing=True, flatten=False)

        # A reference copy's gradient of the step's token mean, and of the mean of micro-batch means.
        reference = copy.deepcopy(model)
        all_rows = [rows[i] for i in steps.step_rows(0)]
        targets = batching.count_targets(all_rows)
        norms, token_mean = {}, None
        for name in ("tokenMean", "meanOfMeans"):
            reference.zero_grad()
            losses = [reference(**collate([row], dist.device)).loss for row in all_rows]
            if name == "tokenMean":
                loss = sum(m * batching.count_targets([row]) for m, row in zip(losses, all_rows)) / targets
                token_mean = loss.item()
            else:
                loss = sum(losses) / len(losses)
            loss.backward()
            grads = [p.grad for p in reference.parameters() if p.requires_grad and p.grad is not None]
            norms[name] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

        # No clipping (so the norm is the gradient's), otherwise the config the trainer plans.
        ds_config = planning.merged(engines.deepspeed_config(config, steps, dist.device), {"gradient_clipping": 1e9})
        engine = engines.build_engine(model, ds_config, config, steps)
        micro_batches = [[rows[i] for i in indices] for indices in steps.micro_batches(0, dist.rank)]
        loss_sum = train.train_step(engine, micro_batches, targets, collate, dist)
        (loss_sum,) = distributed.all_reduce_sum([loss_sum], dist.device)
        return {"engineNorm": float(engine.get_global_grad_norm()), "tokenMeanNorm": norms["tokenMean"],
                "meanOfMeansNorm": norms["meanOfMeans"], "loss": loss_sum / targets, "tokenMean": token_mean,
                "rank": dist.rank}
    finally:
        distributed.teardown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    outcome = {"run": run, "gradient": gradient}[mode](*args)
    if outcome.get("rank", 0) == 0:
        print("PROBE " + json.dumps(outcome), flush=True)
