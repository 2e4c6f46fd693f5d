"""Finding decoder layers (and their projections) across architectures, and parsing --layers."""

from __future__ import annotations

import torch
from torch import nn

from amygdala import AmygdalaError

#: Attribute paths to the decoder-layer list, most specific first. Covers Llama, Mistral,
#: Qwen2/3, Gemma/Gemma3 (incl. the multimodal ``language_model`` wrappers), GPT-2, GPT-NeoX.
LAYER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.model.layers",
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    for path in LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise AmygdalaError(
        f"cannot find decoder layers in {type(model).__name__}: none of "
        f"{', '.join(LAYER_PATHS)} exists; add its path to amygdala.models.layers.LAYER_PATHS"
    )


def block_output(output) -> torch.Tensor:
    """The residual stream a decoder block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


#: Paths, inside a decoder block, to the attention output projection (its input is the heads
#: side by side): Llama/Mistral/Qwen/Gemma, Phi, GPT-2, GPT-J, GPT-NeoX.
ATTN_OUT_PATHS = ("self_attn.o_proj", "self_attn.dense", "attn.c_proj", "attn.out_proj", "attention.dense")
#: Paths to the MLP down projection (its input is the neurons): Llama-likes, GPT-2, NeoX, Phi, LFM2.
MLP_DOWN_PATHS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "feed_forward.w2")


def _projection(block: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        module = _get(block, path)
        if isinstance(module, nn.Module) and getattr(module, "weight", None) is not None:
            return module
    return None


def attention_out_proj(block: nn.Module) -> nn.Module | None:
    """The block's attention output projection; None for a layer without standard attention
    (a hybrid model's Mamba or GatedDeltaNet layer), which per-head diagnostics must skip."""
    return _projection(block, ATTN_OUT_PATHS)


def mlp_down_proj(block: nn.Module) -> nn.Module | None:
    """The block's MLP down projection; None for a mixture of experts (no single one)."""
    return _projection(block, MLP_DOWN_PATHS)


def missing_reason(block: nn.Module, what: str) -> str:
    """Why ``what`` was not found in ``block``, naming what the block holds instead."""
    parts = ", ".join(f"{n} ({type(m).__name__})" for n, m in block.named_children() if "norm" not in n)
    return f"no standard {what} in {type(block).__name__}: it holds {parts}"


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], fp32 on the CPU (GPT-2's Conv1D stores it
    transposed); the CPU copy is where concept vectors live (tensors must meet on one device: the original
    system crashed when a GPU weight met a CPU vector)."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach()
    return (w.T if isinstance(module, Conv1D) else w).float().cpu()


def num_attention_heads(model: nn.Module) -> int:
    config = model.config.get_text_config()
    n = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not n:
        raise AmygdalaError(f"{type(config).__name__} has no num_attention_heads; per-head diagnostics need it")
    return int(n)


def projection_sites(model: nn.Module, layers: list[int]) -> dict[str, nn.Module]:
    """``attn.<l>`` (attention output projection) and ``mlp.<l>`` (MLP down projection) of each
    layer that has them: the extra inputs the quality report pools in the build forward."""
    blocks = find_layers(model)
    sites = {}
    for l in layers:
        for kind, find in (("attn", attention_out_proj), ("mlp", mlp_down_proj)):
            module = find(blocks[l])
            if module is not None:
                sites[f"{kind}.{l}"] = module
    return sites


def parse_layers(spec: str | list, num_layers: int) -> list[int]:
    """``"10,15,20"`` (indices, negative from the end) or ``"0.5,0.66"`` (relative depths).

    A relative depth r picks layer round(r * (num_layers - 1)). Duplicates collapse; the result
    is sorted. Out-of-range values raise with the valid range.
    """
    items = spec if isinstance(spec, list) else [s for s in str(spec).split(",") if s.strip()]
    if not items:
        raise AmygdalaError("layers: empty; give indices like 10,15 or relative depths like 0.5,0.66", param="layers")
    out = []
    for item in items:
        s = str(item).strip()
        try:
            if isinstance(item, float) or "." in s:
                r = float(s)
                if not 0.0 <= r <= 1.0:
                    raise AmygdalaError(f"layers: relative depth {s} outside 0.0-1.0", param="layers")
                idx = round(r * (num_layers - 1))
            else:
                idx = int(s)
                if idx < 0:
                    idx += num_layers
        except ValueError:
            raise AmygdalaError(f"layers: {s!r} is neither a layer index nor a relative depth", param="layers") from None
        if not 0 <= idx < num_layers:
            raise AmygdalaError(
                f"layers: layer {s} out of range; this model has layers 0-{num_layers - 1} "
                f"(or -{num_layers}..-1, or relative depths 0.0-1.0)", param="layers",
            )
        out.append(idx)
    return sorted(set(out))


def relative_depth(idx: int, num_layers: int) -> float:
    return idx / max(1, num_layers - 1)
