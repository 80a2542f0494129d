"""torch.compile of the decoder layers: where it is on by default, and that it changes nothing
but speed (GPU test, run on the device machine)."""

import pytest
import torch

from finetune_trainer import attention, batching, presets
from trainer_helpers import random_sequences


def test_compile_defaults_to_the_benchmarked_gpu_configurations():
    from finetune_trainer.compiling import wanted

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wanted(None, "lora", 2, gpu) and wanted(None, "qlora", 0, gpu) and wanted(None, "full", 2, gpu)
    assert not wanted(None, "dora", 2, gpu) and not wanted(None, "lora", 3, gpu) and not wanted(None, "lora", 2, cpu)
    assert wanted(True, "dora", 3, cpu) and not wanted(False, "lora", 2, gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_layers_match_eager_and_compile_once_for_changing_shapes():
    import torch._dynamo

    from finetune_trainer import adapters, compiling
    from finetune_trainer.config import MethodConfig

    torch._dynamo.reset()
    device = torch.device("cuda")
    model, tokenizer = presets.build_preset("tiny-llama", torch.bfloat16, device)
    attention.register()
    model.config._attn_implementation = attention.choose(device)
    assert attention.flattens(model.config._attn_implementation)
    model = adapters.prepare_for_training(model, MethodConfig(), enable_checkpointing=False)
    collate = batching.Collator(tokenizer, packing=True, flatten=True)
    vocab = model.config.vocab_size
    batches = [
        [random_sequences([5, 17, 9], vocab, seed=1)],
        [random_sequences([33, 2], vocab, seed=2), random_sequences([64], vocab, seed=3)],
        [random_sequences([7, 7, 7, 7, 100], vocab, seed=4)],
    ]
    eager = [model(**collate(b, device)).loss for b in batches]
    compiling.compile_decoder_layers(model)
    compiled = [model(**collate(b, device)).loss for b in batches]
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=2e-2)
    compiled[-1].backward()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs compiled for 3 shapes: layers recompile per shape"
