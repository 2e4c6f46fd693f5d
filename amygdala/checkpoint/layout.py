"""Served tensor names <-> checkpoint tensor names.

Why: vLLM serves some projections merged into one tensor, and the trainer (a transformers
model) and the checkpoint (the model folder's safetensors) use the split names. Every
checkpoint tensor is a row range (dim 0) of one served tensor, so the split is a *view*:

    served (vLLM)                          checkpoint (transformers / safetensors)
    model.layers.N.self_attn.qkv_proj.X    q_proj.X rows [0, q), k_proj.X [q, q+kv), v_proj.X [q+kv, q+2kv)
    model.layers.N.mlp.gate_up_proj.X      gate_proj.X rows [0, i), up_proj.X rows [i, 2i)
    everything else                        same name, rows [0, rows in checkpoint)

Which modules are merged, and in which order, is the served model class's own
``packed_modules_mapping`` (vLLM's, read by the server: :func:`merged_from_packed`); e.g. Qwen3.5
adds ``in_proj_qkvz`` = ``in_proj_qkv`` + ``in_proj_z`` and ``in_proj_ba`` = ``in_proj_b`` +
``in_proj_a``. :data:`MERGED` is Llama's, the default for callers without a vLLM class (tests,
benchmarks, :func:`to_served`). The offsets come from the checkpoint tensors' shapes (parts in
the mapping's order), so no config arithmetic can disagree with the files. "Rows [0, rows)"
also covers vLLM's vocabulary padding: its embedding and lm_head may have more rows than the
checkpoint. With tied embeddings the checkpoint has no ``lm_head.weight``, and a served
``lm_head.weight`` (vLLM shares it with the embedding) is not written back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from amygdala import AmygdalaError

Merged = Mapping[str, Sequence[str]]

#: Llama's merged modules (vLLM's ``LlamaForCausalLM.packed_modules_mapping``), parts in row order.
MERGED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def merged_from_packed(packed: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """A vLLM model class's ``packed_modules_mapping`` as a merge table, checked: each part
    belongs to one merged module (a part under two would make the row offsets ambiguous)."""
    table = {name: tuple(parts) for name, parts in packed.items() if len(parts) > 1 or parts != [name]}
    owners: dict[str, str] = {}
    for name, parts in table.items():
        for part in parts:
            if part in owners:
                raise LayoutError(f"packed_modules_mapping: {part} is part of both {owners[part]} and {name}")
            owners[part] = name
    return table


def _part_of(merged: Merged) -> dict[str, tuple[str, int]]:
    return {part: (name, i) for name, parts in merged.items() for i, part in enumerate(parts)}


class LayoutError(AmygdalaError):
    """Served tensors that do not match the checkpoint (a name or shape the mapping cannot place)."""


@dataclass(frozen=True)
class Rows:
    """Checkpoint tensor = ``served[name][start : start + length]``."""

    name: str
    start: int
    length: int


def _split(name: str, part_of: Mapping[str, tuple[str, int]]) -> tuple[str, str, str] | None:
    """("prefix.", module, ".suffix") when ``name``'s module is one part of a merged tensor."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in part_of:
            return ".".join(parts[:i]) + ".", parts[i], "." + ".".join(parts[i + 1:])
    return None


def checkpoint_rows(shapes: Mapping[str, tuple[int, ...]], merged: Merged = MERGED) -> dict[str, Rows]:
    """Where each checkpoint tensor (name -> shape) lives in the served tensors."""
    part_of = _part_of(merged)
    out: dict[str, Rows] = {}
    for name, shape in shapes.items():
        if not shape:
            raise LayoutError(f"{name}: a scalar tensor cannot be a row range of a served tensor")
        split = _split(name, part_of)
        if split is None:
            out[name] = Rows(name, 0, shape[0])
            continue
        prefix, module, suffix = split
        whole, index = part_of[module]
        start = 0
        for earlier in merged[whole][:index]:
            sibling = f"{prefix}{earlier}{suffix}"
            if sibling not in shapes:
                raise LayoutError(f"{name}: its merged tensor {prefix}{whole}{suffix} needs {sibling}, which is missing")
            start += shapes[sibling][0]
        out[name] = Rows(f"{prefix}{whole}{suffix}", start, shape[0])
    return out


def placements(served_names, shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False,
               merged: Merged = MERGED) -> dict[str, Rows]:
    """Where each checkpoint tensor comes from among ``served_names``.

    A served tensor under the checkpoint's own name is used as is (rows [0, rows)); otherwise
    the merged layout applies. ``tied``: the model ties lm_head to the embedding, so a missing
    served ``lm_head.weight`` is read from the served embedding.
    """
    names = set(served_names)
    rows_of = checkpoint_rows({n: s for n, s in shapes.items() if n not in names}, merged)
    out: dict[str, Rows] = {}
    for name, shape in shapes.items():
        rows = Rows(name, 0, shape[0]) if name in names else rows_of[name]
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
    served: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False,
    merged: Merged = MERGED,
) -> dict[str, torch.Tensor]:
    """Views of ``served`` under the checkpoint's names and shapes (no copies); see :func:`placements`."""
    out: dict[str, torch.Tensor] = {}
    for name, rows in placements(served, shapes, tied=tied, merged=merged).items():
        tensor = served[rows.name]
        want = tuple(shapes[name])
        if tensor.dim() != len(want) or tuple(tensor.shape[1:]) != want[1:] or tensor.shape[0] < rows.start + rows.length:
            raise LayoutError(
                f"{name}: served {rows.name} has shape {tuple(tensor.shape)}, cannot hold rows "
                f"[{rows.start}, {rows.start + rows.length}) of shape {want}"
            )
        out[name] = tensor.narrow(0, rows.start, rows.length)
    return out


def to_served(checkpoint: Mapping[str, torch.Tensor], merged: Merged = MERGED) -> dict[str, torch.Tensor]:
    """Merge checkpoint tensors the way vLLM holds them (new tensors): the inverse of
    :func:`to_checkpoint`, for tests, benchmarks and anyone serving from a transformers model."""
    part_of = _part_of(merged)
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in checkpoint.items():
        split = _split(name, part_of)
        if split is None:
            out[name] = tensor.detach().clone()
            continue
        prefix, module, suffix = split
        whole, index = part_of[module]
        groups.setdefault(f"{prefix}{whole}{suffix}", []).append((index, tensor))
    for name, parts in groups.items():
        parts.sort(key=lambda item: item[0])
        out[name] = torch.cat([t.detach() for _, t in parts], dim=0)
    return out


def unmapped(served_names, shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False,
             merged: Merged = MERGED) -> tuple[list[str], list[str]]:
    """(checkpoint tensors no served tensor holds, served tensors no checkpoint tensor comes from),
    each sorted: everything a family's layout gets wrong at once, for one error at start."""
    names = set(served_names)
    part_of = _part_of(merged)
    embedding = next((n for n in names if n.endswith("embed_tokens.weight")), None)
    missing, used = [], set()
    for name in shapes:
        split = None if name in names else _split(name, part_of)
        target = name if split is None else f"{split[0]}{part_of[split[1]][0]}{split[2]}"
        if target not in names and tied and name.endswith("lm_head.weight") and embedding is not None:
            target = embedding
        if target in names:
            used.add(target)
        else:
            missing.append(name)
    extra = [n for n in names if n not in used and not (tied and n.endswith("lm_head.weight"))]
    return sorted(missing), sorted(extra)
