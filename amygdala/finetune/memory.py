"""How much memory serving plus online training takes: weights, KV cache, optimizer state,
gradients, activations; the formulas behind docs/scale.md's memory plan.

Why a module and not a table in the docs: the plan for a 27B model cannot be measured on this
project's machines, so its numbers come from formulas, and ``tests/test_memory.py`` checks each
formula against what torch actually allocates on small models (the optimizer's state tensors,
the gradients, the tensors autograd saves under activation checkpointing, transformers' KV cache).

Shapes come from a transformers config, with the model built on the meta device (no memory), so
every architecture transformers knows is counted exactly, hybrids included.

One model of a training step's activations serves both the plan and the trainer's memory budget
(:mod:`amygdala.finetune.budget`, enforced before a job is queued): :func:`step_activations`
(what the trainer's step keeps, no checkpointing) and :func:`checkpointed_activations` share the
loss's logits term, :func:`loss_logits`, and both are checked against torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from amygdala.models.layers import find_layers

GIB = 1024**3


@dataclass(frozen=True)
class Shapes:
    """What the formulas need from a model, read off its (meta) parameters and config."""

    params: int  # every parameter, once (tied weights counted once)
    embedding: int  # input embedding (+ untied output embedding): frozen by the trainer
    matrices: tuple[tuple[int, int], ...]  # the 2-D linear weights inside decoder blocks (low-rank targets)
    plain: tuple[int, ...]  # numel of every other trainable tensor (norms, biases)
    layers: int
    hidden: int
    intermediate: int  # the MLP's width
    heads: int  # attention heads (query)
    vocab: int
    attention_layers: int  # layers with a KV cache that grows with the sequence
    kv_heads: int
    head_dim: int
    state_bytes_per_seq: int  # fixed per-sequence state of linear-attention/Mamba layers, in bytes

    @property
    def trainable(self) -> int:
        return sum(m * n for m, n in self.matrices) + sum(self.plain)


def shapes(config) -> Shapes:
    """:class:`Shapes` of the causal LM ``config`` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shapes_of(model)


def shapes_of(model: nn.Module) -> Shapes:
    text = model.config.get_text_config()
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # parameters() yields a tied weight once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    embeds = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    low = {id(m.weight) for block in find_layers(model) for m in block.modules() if isinstance(m, nn.Linear)}
    matrices, plain = [], []
    for p in model.parameters():
        if id(p) in embeds:
            continue
        if id(p) in low and p.dim() == 2:
            matrices.append(tuple(p.shape))
        else:
            plain.append(p.numel())
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    attention = sum(1 for t in layer_types if "attention" in t and "linear" not in t)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return Shapes(
        params=params, embedding=sum(embeds.values()), matrices=tuple(matrices), plain=tuple(plain),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        heads=text.num_attention_heads, vocab=text.vocab_size,
        attention_layers=attention, kv_heads=kv_heads, head_dim=head_dim,
        state_bytes_per_seq=(len(layer_types) - attention) * _linear_state_bytes(text),
    )


def _linear_state_bytes(text) -> int:
    """One linear-attention layer's per-sequence state (Qwen3.5 / Qwen3-Next gated delta net):
    the recurrent state in float32 (vLLM keeps it there) and the conv state in the model dtype (2 bytes)."""
    heads_v = getattr(text, "linear_num_value_heads", None)
    if heads_v is None:
        return 0
    dk, dv = text.linear_key_head_dim, text.linear_value_head_dim
    conv_dim = 2 * text.linear_num_key_heads * dk + heads_v * dv
    return heads_v * dk * dv * 4 + (text.linear_conv_kernel_dim - 1) * conv_dim * 2


# --------------------------------------------------------------------------- the terms
def weights(s: Shapes, dtype_bytes: int, tp: int = 1) -> float:
    """Per GPU: vLLM shards every weight (embeddings by vocabulary) over the tensor-parallel
    ranks; norms are replicated but negligible."""
    return s.params * dtype_bytes / tp


def kv_per_token(s: Shapes, dtype_bytes: int, tp: int = 1) -> float:
    """KV cache bytes per token of context, per GPU (KV heads are split over the ranks, never below one)."""
    heads = max(1, s.kv_heads // tp)
    return 2 * s.attention_layers * heads * s.head_dim * dtype_bytes


def optimizer_state(s: Shapes, kind: str, dtype_bytes: int, rank: int = 64) -> int:
    """Bytes of optimizer state once every trainable tensor has stepped (the embeddings frozen).

    - ``adamw`` (torch): two moments per weight, in the weight's dtype, plus a float32 step tensor each;
    - ``apollo`` / ``apollo-mini`` (:mod:`amygdala.finetune.apollo`): per block matrix m x n two
      moments of its rank-r projection, max(m, n) x min(r, m, n) each, and a 0-d norm; the other
      trainable tensors (norms, biases) plain AdamW moments (step counters are ints, not tensors).
    """
    if kind == "adamw":
        tensors = len(s.matrices) + len(s.plain)
        return 2 * s.trainable * dtype_bytes + 4 * tensors
    r = 1 if kind == "apollo-mini" else rank
    low = sum(2 * max(m, n) * min(r, m, n) * dtype_bytes + dtype_bytes for m, n in s.matrices)
    return low + 2 * sum(s.plain) * dtype_bytes


def gradients(s: Shapes, dtype_bytes: int) -> int:
    """Every trainable tensor's gradient, in its dtype: the trainer steps once per batch, so all are alive then."""
    return s.trainable * dtype_bytes


def loss_logits(positions: int, vocab: int) -> int:
    """The loss's three float32 positions x vocab tensors (logits, their log-softmax, its
    shifted copy or gradient): for a large vocabulary the largest term of a step (a chunked loss
    would remove them)."""
    return 3 * positions * vocab * 4


def reference_bytes(positions: int, vocab: int) -> int:
    """The anchor's fixed reference (:mod:`amygdala.finetune.objectives`): one float32 next-token
    distribution per anchored position, kept for the whole job. For SmolLM2 (49,152 tokens) that
    is 192 KiB a position: 16 samples of 32 continuation tokens hold 96 MiB."""
    return positions * vocab * 4


def checkpointed_activations(s: Shapes, tokens: int, dtype_bytes: int) -> int:
    """Tensors autograd keeps from the forward under activation checkpointing: each block's
    input and the final norm's input and output (tokens x hidden each), and the loss's logits
    over every position (:func:`loss_logits`). The backward pass recomputes one block at a time
    on top: :func:`block_recompute`."""
    return tokens * s.hidden * dtype_bytes * (s.layers + 2) + loss_logits(tokens, s.vocab)


def step_activations(s: Shapes, rows: int, width: int, keep: int, dtype_bytes: int) -> int:
    """An upper bound of what the trainer's step (no checkpointing) keeps for the backward, a
    micro-batch of ``rows`` sequences padded to ``width`` whose loss reads the last ``keep``
    positions (``logits_to_keep``): per token and layer 16 x hidden + 3 x intermediate + heads x
    width values (the last: attention weights when attention is not fused), and the loss's
    logits of the kept positions (:func:`loss_logits`). Within 1.0-1.25x of torch's on small
    models (tests/test_memory.py)."""
    per_token = s.layers * (16 * s.hidden + 3 * s.intermediate + s.heads * width)
    return rows * width * per_token * dtype_bytes + loss_logits(rows * keep, s.vocab)


def block_recompute(s: Shapes, tokens: int, dtype_bytes: int) -> int:
    """Peak extra for recomputing one block in backward, roughly: its matrices' inputs and
    outputs (each linear's in + out features per token) plus a few hidden-sized temporaries."""
    per_token = sum(m + n for m, n in s.matrices) // max(s.layers, 1) + 6 * s.hidden
    return tokens * per_token * dtype_bytes


@dataclass(frozen=True)
class Plan:
    """One setting's memory per GPU, in bytes."""

    gpus: int
    weights: float
    optimizer: float
    gradients: float
    activations: float
    kv_budget: float  # what is left for the KV cache (and the linear-attention state) at the given utilisation

    def sequences(self, s: Shapes, context: int, dtype_bytes: int) -> int:
        """How many sequences of ``context`` tokens the budget holds: each takes its KV cache and,
        in a hybrid, its linear-attention state (both split over the tensor-parallel ranks)."""
        per = context * kv_per_token(s, dtype_bytes, self.gpus) + s.state_bytes_per_seq / self.gpus
        return int(self.kv_budget // per) if self.kv_budget > 0 and per > 0 else 0


def plan(s: Shapes, *, gpus: int, gpu_bytes: float, dtype_bytes: int = 2, optimizer: str | None = None,
         rank: int = 64, train_tokens: int = 4096, train_fraction: float = 1.0, utilisation: float = 0.9) -> Plan:
    """Memory per GPU for serving on ``gpus`` tensor-parallel GPUs, with training (``optimizer``
    given) as if the trainer ran beside each rank on its shard (docs/scale.md: today's trainer
    needs one device; this is the budget a per-rank trainer would have). ``train_fraction``:
    the share of the block weights being trained (e.g. 0.25 for the last quarter of the layers),
    which scales optimizer state and gradients; activations are kept for every layer (conservative)."""
    w = weights(s, dtype_bytes, gpus)
    if optimizer is None:
        opt = grads = acts = 0.0
    else:
        opt = train_fraction * optimizer_state(s, optimizer, dtype_bytes, rank) / gpus
        grads = train_fraction * gradients(s, dtype_bytes) / gpus
        # Under tensor parallelism the block inputs are whole on every rank; logits and a block's
        # projections are split over the ranks.
        replicated = train_tokens * s.hidden * dtype_bytes * (s.layers + 2)
        split = checkpointed_activations(s, train_tokens, dtype_bytes) - replicated + block_recompute(s, train_tokens, dtype_bytes)
        acts = replicated + split / gpus
    left = utilisation * gpu_bytes - w - opt - grads - acts
    return Plan(gpus, w, opt, grads, acts, left)
