"""Which weights online training changes: a chosen set of decoder layers and modules.

Why: in bf16 every trained tensor is rewritten by stochastic rounding at each step (an update
far below half an ulp still moves about half the weights by one ulp, at random), so nearly
every 4 KiB block of every trained tensor changes in every job, and the checkpoint sync writes
the whole trained set plus an equal journal. The sync's cost is therefore the size of what is
trained; choosing a smaller set (the last layers, the MLPs) is what makes it small. The set is
also what the optimizer state is saved for (its parameter names), so a folder's state belongs to
one set: restarting with another asks you to delete the state.

Written as ``AMYGDALA_TRAIN_LAYERS`` (``"20-29"``, ``"0,5,-4--1"``: indices and inclusive ranges,
negative counting from the end) and ``AMYGDALA_TRAIN_MODULES`` (``"mlp"``,
``"self_attn.o_proj,mlp.down_proj"``: module paths inside a decoder block, a parameter is
trained when its path inside the block starts with one). Unset: every block parameter and the
final norm, as before. With either set, only the chosen block parameters train.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from amygdala import AmygdalaError
from amygdala.models.layers import find_layers


class TrainableError(AmygdalaError):
    """A trainable-set setting that cannot be read or selects nothing."""


@dataclass(frozen=True)
class Trainable:
    layers: str = ""  # as written in AMYGDALA_TRAIN_LAYERS; "" = all
    modules: str = ""  # as written in AMYGDALA_TRAIN_MODULES; "" = all

    @property
    def restricted(self) -> bool:
        return bool(self.layers or self.modules)

    def layer_indices(self, n_layers: int) -> list[int]:
        """The chosen layers of a model with ``n_layers`` blocks, sorted; raises naming a bad item."""
        if not self.layers:
            return list(range(n_layers))
        chosen: set[int] = set()
        for item in (x.strip() for x in self.layers.split(",")):
            lo, hi = _range(item)
            for i in (lo, hi):
                if not -n_layers <= i < n_layers:
                    raise TrainableError(f"AMYGDALA_TRAIN_LAYERS: {item!r} is outside the model's {n_layers} layers (0..{n_layers - 1})")
            lo, hi = lo % n_layers, hi % n_layers
            if lo > hi:
                raise TrainableError(f"AMYGDALA_TRAIN_LAYERS: {item!r} runs backwards; write the lower layer first")
            chosen.update(range(lo, hi + 1))
        return sorted(chosen)

    def module_prefixes(self) -> list[str]:
        return [m.strip() for m in self.modules.split(",") if m.strip()]

    def apply(self, model: nn.Module) -> None:
        """Freeze everything outside the set (embeddings are the Trainer's call, made before)."""
        if not self.restricted:
            return
        layers = find_layers(model)
        keep = set(self.layer_indices(len(layers)))
        prefixes = self.module_prefixes()
        chosen = 0
        in_blocks: set[int] = set()
        for i, block in enumerate(layers):
            for name, p in block.named_parameters():
                in_blocks.add(id(p))
                wanted = i in keep and (not prefixes or any(name == m or name.startswith(m + ".") for m in prefixes))
                if not wanted:
                    p.requires_grad_(False)
                chosen += int(wanted and p.requires_grad)
        for p in model.parameters():
            if id(p) not in in_blocks:
                p.requires_grad_(False)  # the final norm and anything outside the blocks
        if not chosen:
            names = sorted({n.split(".")[0] for n, _ in layers[0].named_parameters()})
            raise TrainableError(f"AMYGDALA_TRAIN_MODULES={self.modules!r} selects no parameter; a block holds {', '.join(names)}")

    def describe(self) -> dict:
        """For ``GET /train/status``: the set as configured ("all" when unrestricted)."""
        return {"layers": self.layers or "all", "modules": self.modules or "all"}


def _range(item: str) -> tuple[int, int]:
    """'5' -> (5, 5); '2-4' -> (2, 4); '-4--1' -> (-4, -1)."""
    try:
        head, sep, tail = item[1:].partition("-") if item.startswith("-") else item.partition("-")
        lo = int(("-" if item.startswith("-") else "") + head)
        return lo, int(tail) if sep else lo
    except ValueError:
        raise TrainableError(f"AMYGDALA_TRAIN_LAYERS: {item!r} is not a layer index or a range like 20-29") from None
