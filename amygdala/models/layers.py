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


def parse_layers(spec: str | list, num_layers: int) -> list[int]:
    """``"10,15,20"`` (indices, negative from the end) or ``"0.5,0.66"`` (relative depths).

    A relative depth r picks layer round(r * (num_layers - 1)). Duplicates collapse; the result
    is sorted. Out-of-range values raise with the valid range.
    """
    items = spec if isinstance(spec, list) else [s for s in str(spec).split(",") if s.strip()]
    if not items:
        raise AmygdalaError("--layers: empty; give indices like 10,15 or relative depths like 0.5,0.66")
    out = []
    for item in items:
        s = str(item).strip()
        try:
            if isinstance(item, float) or "." in s:
                r = float(s)
                if not 0.0 <= r <= 1.0:
                    raise AmygdalaError(f"--layers: relative depth {s} outside 0.0-1.0")
                idx = round(r * (num_layers - 1))
            else:
                idx = int(s)
                if idx < 0:
                    idx += num_layers
        except ValueError:
            raise AmygdalaError(f"--layers: {s!r} is neither a layer index nor a relative depth") from None
        if not 0 <= idx < num_layers:
            raise AmygdalaError(
                f"--layers: layer {s} out of range; this model has layers 0-{num_layers - 1} "
                f"(or -{num_layers}..-1, or relative depths 0.0-1.0)"
            )
        out.append(idx)
    return sorted(set(out))


def relative_depth(idx: int, num_layers: int) -> float:
    return idx / max(1, num_layers - 1)
