"""Served tensor names <-> checkpoint tensor names, for Llama-style layouts (Llama, Mistral, Qwen2/3).

Why: vLLM serves some projections merged into one tensor, and the trainer (a transformers
model) and the checkpoint (the model folder's safetensors) use the split names. Every
checkpoint tensor is a row range (dim 0) of one served tensor, so the split is a *view*:

    served (vLLM)                          checkpoint (transformers / safetensors)
    model.layers.N.self_attn.qkv_proj.X    q_proj.X rows [0, q), k_proj.X [q, q+kv), v_proj.X [q+kv, q+2kv)
    model.layers.N.mlp.gate_up_proj.X      gate_proj.X rows [0, i), up_proj.X rows [i, 2i)
    everything else                        same name, rows [0, rows in checkpoint)

X is ``weight`` (and ``bias`` for Qwen2's q/k/v); q = heads * head_dim, kv = kv_heads * head_dim,
i = intermediate_size. The offsets come from the checkpoint tensors' shapes (parts in the order
above), so no config arithmetic can disagree with the files. "Rows [0, rows)" also covers vLLM's
vocabulary padding: its embedding and lm_head may have more rows than the checkpoint. With tied
embeddings the checkpoint has no ``lm_head.weight``, and a served ``lm_head.weight`` (vLLM
shares it with the embedding) is not written back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from amygdala import AmygdalaError

#: Merged served module name -> its parts, in row order.
MERGED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_PART_OF = {part: (merged, i) for merged, parts in MERGED.items() for i, part in enumerate(parts)}


class LayoutError(AmygdalaError):
    """Served tensors that do not match the checkpoint (a name or shape the mapping cannot place)."""


@dataclass(frozen=True)
class Rows:
    """Checkpoint tensor = ``served[name][start : start + length]``."""

    name: str
    start: int
    length: int


def _split(name: str) -> tuple[str, str, str] | None:
    """("prefix.", module, ".suffix") when ``name``'s module is one part of a merged tensor."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _PART_OF:
            return ".".join(parts[:i]) + ".", parts[i], "." + ".".join(parts[i + 1:])
    return None


def checkpoint_rows(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Rows]:
    """Where each checkpoint tensor (name -> shape) lives in the served tensors."""
    out: dict[str, Rows] = {}
    for name, shape in shapes.items():
        if not shape:
            raise LayoutError(f"{name}: a scalar tensor cannot be a row range of a served tensor")
        split = _split(name)
        if split is None:
            out[name] = Rows(name, 0, shape[0])
            continue
        prefix, module, suffix = split
        merged, index = _PART_OF[module]
        start = 0
        for earlier in MERGED[merged][:index]:
            sibling = f"{prefix}{earlier}{suffix}"
            if sibling not in shapes:
                raise LayoutError(f"{name}: its merged tensor {prefix}{merged}{suffix} needs {sibling}, which is missing")
            start += shapes[sibling][0]
        out[name] = Rows(f"{prefix}{merged}{suffix}", start, shape[0])
    return out


def placements(served_names, shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False) -> dict[str, Rows]:
    """Where each checkpoint tensor comes from among ``served_names``.

    A served tensor under the checkpoint's own name is used as is (rows [0, rows)); otherwise
    the merged layout applies. ``tied``: the model ties lm_head to the embedding, so a missing
    served ``lm_head.weight`` is read from the served embedding.
    """
    names = set(served_names)
    merged = checkpoint_rows({n: s for n, s in shapes.items() if n not in names})
    out: dict[str, Rows] = {}
    for name, shape in shapes.items():
        rows = Rows(name, 0, shape[0]) if name in names else merged[name]
        if rows.name not in names and tied and rows.name.endswith("lm_head.weight"):
            embedding = next((n for n in names if n.endswith("embed_tokens.weight")), None)
            if embedding is not None:
                rows = Rows(embedding, 0, shape[0])
        if rows.name not in names:
            raise LayoutError(
                f"{name}: no served tensor {rows.name}; served names look like {', '.join(sorted(names)[:3])}"
            )
        out[name] = rows
    return out


def to_checkpoint(
    served: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False
) -> dict[str, torch.Tensor]:
    """Views of ``served`` under the checkpoint's names and shapes (no copies); see :func:`placements`."""
    out: dict[str, torch.Tensor] = {}
    for name, rows in placements(served, shapes, tied=tied).items():
        tensor = served[rows.name]
        want = tuple(shapes[name])
        if tensor.dim() != len(want) or tuple(tensor.shape[1:]) != want[1:] or tensor.shape[0] < rows.start + rows.length:
            raise LayoutError(
                f"{name}: served {rows.name} has shape {tuple(tensor.shape)}, cannot hold rows "
                f"[{rows.start}, {rows.start + rows.length}) of shape {want}"
            )
        out[name] = tensor.narrow(0, rows.start, rows.length)
    return out


def to_served(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge checkpoint tensors the way vLLM holds them (new tensors): the inverse of
    :func:`to_checkpoint`, for tests, benchmarks and anyone serving from a transformers model."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in checkpoint.items():
        split = _split(name)
        if split is None:
            out[name] = tensor.detach().clone()
            continue
        prefix, module, suffix = split
        merged, index = _PART_OF[module]
        groups.setdefault(f"{prefix}{merged}{suffix}", []).append((index, tensor))
    for name, parts in groups.items():
        parts.sort(key=lambda item: item[0])
        out[name] = torch.cat([t.detach() for _, t in parts], dim=0)
    return out
