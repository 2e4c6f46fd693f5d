"""The memory plan's formulas (amygdala.finetune.memory, docs/scale.md) against what torch
allocates on tiny models: weights, optimizer state after a step, gradients, the tensors autograd
keeps under activation checkpointing and in the trainer's step (the budget's model), and
transformers' KV cache."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny
from amygdala.finetune import memory
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer, state_nbytes


def _model(arch: str, dtype: torch.dtype):
    model, _ = tiny.make_model(arch, hidden=128, layers=3, heads=2)
    model = model.to(dtype).train()
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        m.weight.requires_grad_(False)  # as the trainer does
    return model


def _step(model, optimizer) -> None:
    ids = torch.randint(10, 100, (1, 24))
    model(ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,rank", [("adamw", None), ("apollo", 16), ("apollo", 512), ("apollo-mini", None)])
def test_optimizer_state_and_gradients_are_what_torch_allocates(arch, dtype, kind, rank):
    model = _model(arch, dtype)
    s = memory.shapes_of(model)
    optimizer, _ = build_optimizer(model, OptimizerSettings(kind, rank=rank))
    _step(model, optimizer)
    size = dtype.itemsize
    assert memory.optimizer_state(s, kind, size, rank=rank or 64) == state_nbytes(optimizer)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert memory.gradients(s, size) == grads
    assert memory.weights(s, size) == sum(p.numel() * p.element_size() for p in set(model.parameters()))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_checkpointed_activations_are_what_autograd_keeps(arch):
    """Every storage the forward saves for backward, counted once, with checkpointing on."""
    model = _model(arch, torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = 64
    ids = torch.randint(10, 100, (1, tokens))
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, use_cache=False)
    want = memory.checkpointed_activations(memory.shapes_of(model), tokens, 4)
    # Left out of the formula: rotary tables and the labels (tokens x head_dim, tokens): < 1% here.
    assert want <= sum(saved.values()) <= want * 1.01


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rows,context,continuation", [(1, 24, 8), (2, 40, 16), (3, 60, 4)])
def test_step_activations_bound_what_the_trainers_step_keeps(arch, rows, context, continuation):
    """The budget's model of a step (the trainer's loss, no checkpointing) against every storage
    autograd saves for the backward, the parameters left out (they exist anyway): an upper bound,
    and not a loose one."""
    from amygdala.finetune.budget import Dims
    from amygdala.finetune.objectives import continuation_logprobs

    model = _model(arch, torch.float32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    contexts = [list(range(10, 10 + context))] * rows
    continuations = [list(range(20, 20 + continuation))] * rows
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        continuation_logprobs(model, contexts, continuations)
    dims = Dims.of(model)  # what the budget reads off the trainer's model
    want = memory.step_activations(dims.shapes, rows, context + continuation, continuation + 1, dims.value_bytes)
    assert sum(saved.values()) <= want <= 1.5 * sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_kv_per_token_is_what_the_cache_holds(arch):
    model = _model(arch, torch.float32).eval()
    tokens = 20
    with torch.no_grad():
        cache = model(torch.randint(10, 100, (1, tokens)), use_cache=True).past_key_values
    held = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    assert memory.kv_per_token(memory.shapes_of(model), 4) * tokens == held


def test_a_hybrid_counts_only_its_attention_layers_in_the_kv_cache():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3_5_text", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=200, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    s = memory.shapes(config)
    assert (s.layers, s.attention_layers) == (4, 1)
    assert memory.kv_per_token(s, 2) == 2 * 1 * 1 * 64 * 2
    conv = 2 * 2 * 32 + 4 * 32
    assert s.state_bytes_per_seq == 3 * (4 * 32 * 32 * 4 + 3 * conv * 2)


def test_tensor_parallel_plan_divides_the_sharded_terms():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    s = memory.shapes(config)
    one = memory.plan(s, gpus=1, gpu_bytes=2**30, optimizer="apollo-mini")
    two = memory.plan(s, gpus=2, gpu_bytes=2**30, optimizer="apollo-mini")
    assert two.weights == one.weights / 2 and two.optimizer == one.optimizer / 2
    assert memory.kv_per_token(s, 2, tp=2) == memory.kv_per_token(s, 2) / 2
    assert memory.kv_per_token(s, 2, tp=4) == memory.kv_per_token(s, 2) / 2  # 2 KV heads: replicated past 2 ranks


def test_plan_keeps_block_inputs_whole_on_every_rank():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    s = memory.shapes(config)
    one = memory.plan(s, gpus=1, gpu_bytes=2**30, optimizer="apollo", train_tokens=100)
    two = memory.plan(s, gpus=2, gpu_bytes=2**30, optimizer="apollo", train_tokens=100)
    inputs = 100 * 256 * 2 * (2 + 2)
    assert two.activations - inputs == (one.activations - inputs) / 2
