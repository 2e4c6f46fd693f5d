"""Readout and steering on a transformers model, as a context manager that works with generate().

Hooks sit on the decoder blocks at the readout's layers. Steering adds a vector to the block
output (the residual stream) at every position that passes, prompt and generated tokens alike;
readout projects the (steered) block output on the concept vectors. With a KV cache each
generation step runs only the new position, so scores arrive one position per step and are
concatenated: ``session.scores()`` always has one row per position the model has processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amygdala.models.layers import block_output, find_layers
from amygdala.readout.format import Readout, ReadoutError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Steering:
    """Vectors to add to the residual stream, per layer: a value you can add and scale.

    ``Steering.from_concepts(readout, {"calm": 4, "angry": -2})`` adds 4 x calm's unit vector and
    -2 x angry's at each of the readout's layers (or ``layers``). Strength is in residual-stream
    units: the added vector has norm ``|strength|`` before summing.

    Args:
        deltas: per decoder layer, the [hidden] vector added to that block's output.
    """

    deltas: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_concepts(
        cls, readout: Readout, strengths: Mapping[str, float], layers: list[int] | None = None
    ) -> Steering:
        """The sum of ``strength`` x each named concept's unit vector, at each of ``layers``.

        Args:
            readout: where the concepts' vectors come from.
            strengths: concept name -> strength in residual-stream units (negative steers away).
            layers: the layers to steer (default: all of the readout's).

        Returns:
            The :class:`Steering` to pass to :func:`attach`.

        Raises:
            ReadoutError: an unknown concept (the nearest names listed), a layer not in the
                readout, or a strength that is not a number.
        """
        layers = readout.layers if layers is None else layers
        missing = [l for l in layers if l not in readout.vectors]
        if missing:
            raise ReadoutError(f"steering layers {missing} are not in the readout (it has {readout.layers})")
        deltas: dict[int, torch.Tensor] = {}
        for name, strength in strengths.items():
            if not isinstance(strength, (int, float)) or isinstance(strength, bool):
                raise ReadoutError(f"steering strength for {name!r} must be a number, got {strength!r}")
            i = readout.concept_index(name)
            for l in layers:
                deltas[l] = deltas.get(l, 0) + float(strength) * readout.vectors[l][i]
        return cls(deltas)

    @classmethod
    def from_vector(cls, vector: torch.Tensor, strength: float, layers: list[int]) -> Steering:
        """A raw direction (normalised here) added with ``strength`` at ``layers``.

        Args:
            vector: a [hidden] direction of any norm.
            strength: the norm of the vector added, in residual-stream units.
            layers: the layers to add it at.

        Returns:
            The :class:`Steering` adding it.
        """
        v = vector.float() / vector.float().norm().clamp_min(1e-12)
        return cls({l: strength * v for l in layers})

    def __add__(self, other: Steering) -> Steering:
        deltas = dict(self.deltas)
        for l, d in other.deltas.items():
            deltas[l] = deltas[l] + d if l in deltas else d
        return Steering(deltas)

    def __mul__(self, k: float) -> Steering:
        return Steering({l: k * d for l, d in self.deltas.items()})

    __rmul__ = __mul__


@dataclass
class ReadoutSession:
    """What :func:`attach` records: per forward call, per layer, [batch, positions, n_concepts]."""

    readout: Readout
    _chunks: list[list[torch.Tensor]] = field(default_factory=list)
    _track_chunks: list[list[torch.Tensor]] = field(default_factory=list)

    def scores(self) -> torch.Tensor:
        """[batch, positions, n_layers, n_concepts] raw projections, all forward calls joined."""
        if not self._chunks:
            raise RuntimeError("nothing recorded yet: run the model inside the attach() block")
        per_call = [torch.stack(layers, dim=2) for layers in self._chunks]
        return torch.cat(per_call, dim=1)

    def zscores(self, against: str | None = None) -> torch.Tensor:
        return self.readout.zscore(self.scores(), against)

    def tracks(self) -> torch.Tensor | None:
        """[batch, positions, n_layers, n_tracks] raw projections on the readout's tracks
        (emotionality, valence); ``None`` when the file has none."""
        if not self._track_chunks:
            return None
        return torch.cat([torch.stack(layers, dim=2) for layers in self._track_chunks], dim=1)

    def track_zscores(self) -> torch.Tensor | None:
        raw = self.tracks()
        return None if raw is None else self.readout.track_zscore(raw)


@contextmanager
def attach(
    model: PreTrainedModel,
    readout: Readout,
    *,
    steering: Steering | None = None,
    record: bool = True,
) -> Iterator[ReadoutSession]:
    """Read out (and optionally steer) ``model`` inside the ``with`` block.

    Hooks go on the decoder blocks at the readout's layers (and the steering's) when the block
    is entered and come off when it exits, even on an exception, so the model is plain again.

    Args:
        model: a transformers causal LM of the shape the readout was built for (checked here).
        readout: the concept vectors to read; its statistics turn scores into z-scores.
        steering: vectors added to the block outputs at every position, prompt and generated.
        record: keep each position's scores (``False``: steer only, nothing kept).

    Returns:
        A context manager yielding the :class:`ReadoutSession` whose ``scores()`` /
        ``zscores()`` hold one row per position the model processed inside the block.

    Raises:
        ReadoutError: the readout or a steering layer does not fit the model.

    >>> with attach(model, readout, steering=Steering.from_concepts(readout, {"calm": 4})) as s:
    ...     model.generate(**inputs, max_new_tokens=20)
    >>> s.zscores().shape  # [batch, prompt + generated positions - 1, n_layers, n_concepts]
    """
    blocks = find_layers(model)
    hidden = model.config.get_text_config().hidden_size
    readout.check_model(len(blocks), hidden, type(model).__name__)
    param = next(model.parameters())
    vectors = {l: readout.vectors[l].to(param.device, param.dtype) for l in readout.layers}
    tracks = {l: readout.track_vectors[l].to(param.device, param.dtype) for l in readout.layers} if readout.track_names else {}
    deltas = {}
    if steering is not None:
        for l, d in steering.deltas.items():
            if not 0 <= l < len(blocks):
                raise ReadoutError(f"steering layer {l} out of range 0-{len(blocks) - 1}")
            deltas[l] = d.to(param.device, param.dtype)
    session = ReadoutSession(readout)
    hooked = sorted(set(readout.layers) | set(deltas))
    pending: dict[int, torch.Tensor] = {}
    pending_tracks: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            h = block_output(output)
            if layer in deltas:
                h = h + deltas[layer]
                output = (h, *output[1:]) if isinstance(output, (tuple, list)) else h
            if record and layer in vectors:
                pending[layer] = (h.detach() @ vectors[layer].T).float().cpu()
                if tracks:
                    pending_tracks[layer] = (h.detach() @ tracks[layer].T).float().cpu()
                if len(pending) == len(vectors):
                    session._chunks.append([pending.pop(l) for l in readout.layers])
                    if tracks:
                        session._track_chunks.append([pending_tracks.pop(l) for l in readout.layers])
            return output
        return hook

    handles = [blocks[l].register_forward_hook(make_hook(l)) for l in hooked]
    try:
        yield session
    finally:
        for h in handles:
            h.remove()
