"""Readout and steering on a transformers model, as a context manager that works with generate().

Hooks sit on the decoder blocks at the readout's layers. Steering adds a vector to the block
output (the residual stream) at the positions it is placed at (:data:`POSITIONS`, ``from_token``;
default every position, prompt and generated tokens alike); readout projects the (steered) block
output on the concept vectors. With a KV cache each
generation step runs only the new position, so scores arrive one position per step and are
concatenated: ``session.scores()`` always has one row per position the model has processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amygdala.models.layers import block_output, find_layers
from amygdala.readout.format import Readout, ReadoutError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


#: Where a steering term is added. "generated": the positions of tokens the model generated
#: (position >= the prompt's length), so the forward that samples the first new token reads an
#: unsteered prompt, as steering-vectors' ``min_token_index=len(prompt)`` does; the prompt's KV is
#: then exactly the unsteered KV. "prompt": the prompt's positions only.
POSITIONS = ("all", "generated", "prompt")
#: The largest ``from_token``: past any context length, and within int64 position arithmetic.
MAX_POSITION = 2**31 - 1


def placement_mask(positions: Any, prompt_len: int, where: str = "all", from_token: int | None = None) -> Any:
    """Which of ``positions`` (a torch or numpy integer array of positions in the whole
    sequence) a term placed at ``where`` / ``from_token`` steers; the one rule transformers and
    the vLLM worker share."""
    mask = positions >= 0
    if where == "generated":
        mask = mask & (positions >= prompt_len)
    elif where == "prompt":
        mask = mask & (positions < prompt_len)
    if from_token is not None:
        mask = mask & (positions >= from_token)
    return mask


def check_placement(where: object, from_token: object) -> None:
    """Raises ReadoutError for a placement outside :data:`POSITIONS` or a from_token that is not an int >= 0."""
    if where not in POSITIONS:
        raise ReadoutError(f"positions: steering is placed at one of {', '.join(POSITIONS)}, got {where!r}",
                           param="positions")
    if from_token is not None and (isinstance(from_token, bool) or not isinstance(from_token, int)
                                   or not 0 <= from_token <= MAX_POSITION):
        raise ReadoutError(f"from_token: steering starts at a whole-number position 0..{MAX_POSITION}, got "
                           f"{str(from_token)[:20]!r}",
                           param="from_token")


@dataclass(frozen=True)
class Steering:
    """Vectors to add to the residual stream, per layer: a value you can add and scale.

    ``Steering.from_concepts(readout, {"calm": 4, "angry": -2})`` adds 4 x calm's unit vector and
    -2 x angry's at each of the readout's layers (or ``layers``). Strength is in residual-stream
    units: the added vector has norm ``|strength|`` before summing.

    ``.placed("generated")`` / ``.placed(from_token=12)`` limits where it is added (see
    :data:`POSITIONS`); steerings placed differently do not add up into one (pass a list of them
    to :func:`attach`).

    Args:
        deltas: per decoder layer, the [hidden] vector added to that block's output.
        positions: "all" (default), "generated" or "prompt".
        from_token: steer only positions >= this one in the whole sequence (prompt included).
    """

    deltas: Mapping[int, torch.Tensor] = field(default_factory=dict)
    positions: str = "all"
    from_token: int | None = None

    def __post_init__(self) -> None:
        check_placement(self.positions, self.from_token)

    def placed(self, positions: str = "all", from_token: int | None = None) -> Steering:
        """The same vectors added only at ``positions`` and from ``from_token`` on."""
        return replace(self, positions=positions, from_token=from_token)

    @property
    def everywhere(self) -> bool:
        return self.positions == "all" and self.from_token is None

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
        if (self.positions, self.from_token) != (other.positions, other.from_token):
            raise ReadoutError("steerings placed at different positions do not add into one; pass them to attach() "
                               "as a list")
        deltas = dict(self.deltas)
        for l, d in other.deltas.items():
            deltas[l] = deltas[l] + d if l in deltas else d
        return replace(self, deltas=deltas)

    def __mul__(self, k: float) -> Steering:
        return replace(self, deltas={l: k * d for l, d in self.deltas.items()})

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
    steering: Steering | Sequence[Steering] | None = None,
    record: bool = True,
) -> Iterator[ReadoutSession]:
    """Read out (and optionally steer) ``model`` inside the ``with`` block.

    Hooks go on the decoder blocks at the readout's layers (and the steering's) when the block
    is entered and come off when it exits, even on an exception, so the model is plain again.

    Args:
        model: a transformers causal LM of the shape the readout was built for (checked here).
        readout: the concept vectors to read; its statistics turn scores into z-scores.
        steering: vectors added to the block outputs at the positions each is placed at (a list:
            several terms placed differently). Positions count from the start of the sequence as
            the model sees it, padding included; the prompt is the first forward call that starts
            at position 0 (``generate()``'s prefill), so "generated" is every later position.
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
    terms = [steering] if isinstance(steering, Steering) else list(steering or [])
    placed: list[tuple[Steering, dict[int, torch.Tensor]]] = []
    for term in terms:
        for l in term.deltas:
            if not 0 <= l < len(blocks):
                raise ReadoutError(f"steering layer {l} out of range 0-{len(blocks) - 1}")
        placed.append((term, {l: d.to(param.device, param.dtype) for l, d in term.deltas.items()}))
    session = ReadoutSession(readout)
    hooked = sorted(set(readout.layers).union(*(d for _, d in placed)))
    pending: dict[int, torch.Tensor] = {}
    pending_tracks: dict[int, torch.Tensor] = {}
    # The current forward's first position and the sequence's prompt length (set by the pre-hook).
    where = {"start": 0, "prompt": 0}

    def delta(layer: int, h: torch.Tensor) -> torch.Tensor | None:
        out = None
        for term, deltas in placed:
            if layer not in deltas:
                continue
            d = deltas[layer]
            if not term.everywhere:
                pos = torch.arange(where["start"], where["start"] + h.shape[-2], device=h.device)
                mask = placement_mask(pos, where["prompt"], term.positions, term.from_token)
                d = mask.to(h.dtype)[:, None] * d
            out = d if out is None else out + d
        return out

    def make_hook(layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            h = block_output(output)
            d = delta(layer, h)
            if d is not None:
                h = h + d
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

    def locate(_module: nn.Module, args: Any, kwargs: dict) -> None:
        """Where this forward's rows sit in the sequence: from ``cache_position`` (generate()
        passes it) or the KV cache's length, else 0 (a plain call on a whole sequence)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache_position, past = kwargs.get("cache_position"), kwargs.get("past_key_values")
        start = 0
        if cache_position is not None and cache_position.numel():
            start = int(cache_position.reshape(-1)[0])
        elif past is not None and hasattr(past, "get_seq_length"):
            start = int(past.get_seq_length())
        where["start"] = start
        if start == 0 and ids is not None:
            where["prompt"] = int(ids.shape[1])

    handles = [blocks[l].register_forward_hook(make_hook(l)) for l in hooked]
    if any(not term.everywhere for term, _ in placed):
        handles.append(model.register_forward_pre_hook(locate, with_kwargs=True))
    try:
        yield session
    finally:
        for h in handles:
            h.remove()
