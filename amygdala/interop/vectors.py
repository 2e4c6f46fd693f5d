"""One steering vector per layer, the form every interchange format reduces to.

llama.cpp's control vectors, repeng's ``ControlVector`` and steering-vectors' ``SteeringVector``
all hold the same thing: for some decoder blocks, a vector added to that block's output at every
position. They differ in container and in whether the vector carries its strength, not in
meaning, so each format module only converts between its container and :class:`LayerVectors`,
and the readout side (:func:`from_readout`, :func:`add_concept`) is written once.

Layer numbers here are amygdala's: layer ``L`` is the output of decoder block ``L`` (0-based),
transformers' ``hidden_states[L + 1]``. llama.cpp's ``direction.L``, repeng's ``directions[L]``
and steering-vectors' ``layer_activations[L]`` (``layer_type="decoder_block"``) are added at
that same place, so no format needs an offset (docs/interop.md has the evidence).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from amygdala import AmygdalaError, __version__
from amygdala.readout import Readout, Steering

#: The formats `amygdala export` writes and `amygdala import` reads.
FORMATS = ("gguf", "repeng", "steering-vectors")


class InteropError(AmygdalaError):
    """A vector file or an export/import request that cannot be used; names the file or field."""


def check_format(name: str) -> str:
    if name not in FORMATS:
        near = difflib.get_close_matches(name, FORMATS, n=1, cutoff=0.0)
        raise InteropError(f"fmt {name!r}: unknown; expected one of {', '.join(FORMATS)} (nearest: {near[0]})",
                           param="fmt")
    return name


@dataclass(frozen=True)
class LayerVectors:
    """A vector per layer (float32 [hidden]) plus what its file said about where it came from.

    ``directions`` carry their strength: adding ``directions[L]`` to block ``L``'s output is
    the whole steering (formats that keep a separate scale apply it at load time).
    """

    directions: dict[int, torch.Tensor]
    model_hint: str | None = None
    #: amygdala's own record of an exported vector (concepts, strength, readout), when present.
    origin: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).numel())

    def check(self, where: str) -> LayerVectors:
        """Raise unless there is at least one layer and every vector is finite, 1-D and the same size."""
        if not self.directions:
            raise InteropError(f"{where}: holds no layer vectors; nothing to import")
        sizes = {l: tuple(v.shape) for l, v in self.directions.items()}
        if any(len(s) != 1 for s in sizes.values()) or len(set(sizes.values())) != 1:
            raise InteropError(f"{where}: layer vectors must be 1-D and of one size, got {sizes}")
        bad = [l for l in self.layers if l < 0]
        if bad:
            raise InteropError(f"{where}: negative layer numbers {bad}; layers count blocks from 0")
        for l in self.layers:
            if not torch.isfinite(self.directions[l]).all():
                raise InteropError(f"{where}: the layer {l} vector holds NaN or inf values")
        return self


def from_readout(
    readout: Readout,
    weights: Mapping[str, float],
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
    model_hint: str | None = None,
) -> LayerVectors:
    """The combined vector ``strength * sum(weight * unit vector)`` at each of ``layers``.

    This is exactly what ``amygdala generate --steer`` adds (``Steering.from_concepts``), so a
    file applied at scale 1 steers like ``--steer`` with ``strength * weight`` per concept.
    """
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not torch.isfinite(torch.tensor(float(strength))):
        raise InteropError(f"strength {strength!r}: must be a finite number", param="strength")
    layers = list(readout.layers if layers is None else layers)
    missing = [l for l in layers if l not in readout.vectors]
    if missing:
        raise InteropError(f"layers {missing}: not in the readout (it has layers {readout.layers})", param="layers")
    steering = Steering.from_concepts(readout, dict(weights), layers=layers) * float(strength)
    model = readout.meta.get("model") or {}
    hint = model_hint or model.get("model_type") or model.get("name") or "unknown"
    origin = {
        "concepts": {k: float(v) for k, v in weights.items()},
        "strength": float(strength),
        "model": model.get("name"),
        "num_layers": model.get("num_layers"),
        "site": "block_output",
        "created_by": f"amygdala {__version__}",
    }
    directions = {l: steering.deltas[l].detach().float().cpu().contiguous() for l in layers}
    return LayerVectors(directions, hint, origin).check("the export")


def add_concept(
    readout: Readout,
    vectors: LayerVectors,
    name: str,
    provenance: dict,
    num_layers: int | None = None,
) -> Readout:
    """``readout`` with one more concept: ``vectors`` at the readout's layers, as unit rows.

    The file's norm per layer is its strength, not part of the concept; it is kept in the
    provenance so ``--steer NAME=norm`` reproduces the file. Statistics are not computed here
    (that needs the model): a readout with statistics gets NaN rows the caller must fill.
    """
    if not name or name.strip() != name:
        raise InteropError(f"name {name!r}: give a concept name without surrounding spaces", param="name")
    if name in readout.concepts:
        raise InteropError(f"name {name!r}: the readout already has a concept of that name; choose another name",
                           param="name")
    num_layers = num_layers or (readout.meta.get("model") or {}).get("num_layers")
    check_fits(vectors, readout.hidden_size, num_layers, "the readout's model", provenance.get("from", "the file"))
    missing = [l for l in readout.layers if l not in vectors.directions]
    if missing:
        raise InteropError(
            f"{provenance.get('from', 'the file')}: no vector for the readout's layer(s) {missing} (the file has "
            f"{vectors.layers}); import into a new readout (--into NEW_FOLDER) to keep the file's layers"
        )
    rows, norms = {}, {}
    for l in readout.layers:
        v = vectors.directions[l].float()
        norm = float(v.norm())
        if norm == 0.0:
            raise InteropError(f"{provenance.get('from', 'the file')}: the layer {l} vector is all zeros; it has no direction")
        rows[l], norms[str(l)] = v / norm, norm
    vec = {l: torch.cat([readout.vectors[l], rows[l][None]]) for l in readout.layers}
    mean = std = None
    if readout.has_stats:
        nan = torch.full((1,), float("nan"))
        mean = {l: torch.cat([readout.mean[l], nan]) for l in readout.layers}
        std = {l: torch.cat([readout.std[l], nan]) for l in readout.layers}
    meta = dict(readout.meta)
    for key, value in (("clusters", "imported"), ("valence", None), ("arousal", None), ("descriptions", "")):
        if isinstance(meta.get(key), list):  # per-concept lists stay aligned with the concepts
            meta[key] = [*meta[key], value]
    imported = dict(meta.get("imported") or {})
    unused = [l for l in vectors.layers if l not in readout.layers]
    imported[name] = {**provenance, "layers_in_file": vectors.layers, "layers_unused": unused, "norms": norms,
                      "imported_by": f"amygdala {__version__}"}
    meta["imported"] = imported
    # The tracks (emotionality, valence) do not depend on the concept list and stay; the emotional
    # statistics are not measured for the new row, so the result z-scores against neutral text.
    return Readout([*readout.concepts, name], list(readout.layers), vec, mean, std, meta,
                   track_names=list(readout.track_names), track_vectors=dict(readout.track_vectors),
                   track_mean=dict(readout.track_mean), track_std=dict(readout.track_std))


def fill_statistics(readout: Readout, name: str, mean: Mapping[int, float], std: Mapping[int, float]) -> Readout:
    """Set the neutral-text statistics of concept ``name`` (left NaN by :func:`add_concept`)."""
    if not readout.has_stats:
        raise InteropError("this readout keeps no statistics; there is nothing to fill")
    i = readout.concept_index(name)
    for l in readout.layers:
        readout.mean[l][i], readout.std[l][i] = float(mean[l]), float(std[l])
    return readout


def new_readout(vectors: LayerVectors, name: str, provenance: dict, model_name: str, num_layers: int, hidden_size: int) -> Readout:
    """A readout of one concept at the file's own layers, for a model of this shape (no statistics)."""
    check_fits(vectors, hidden_size, num_layers, model_name, provenance.get("from", "the file"))
    empty = Readout(
        concepts=[], layers=vectors.layers,
        vectors={l: torch.empty(0, vectors.hidden_size) for l in vectors.layers},
        meta={"dtype": "float32", "model": {"name": model_name, "num_layers": num_layers}},
    )
    return add_concept(empty, vectors, name, provenance, num_layers)


def check_fits(vectors: LayerVectors, hidden_size: int, num_layers: int | None, model: str, where: str) -> None:
    """The file's vectors must have the model's hidden size and name blocks the model has."""
    if vectors.hidden_size != hidden_size:
        raise InteropError(
            f"{where}: vectors of size {vectors.hidden_size} do not fit {model} (hidden size {hidden_size}); "
            "use a vector made for this model"
        )
    if num_layers is not None:
        bad = [l for l in vectors.layers if l >= num_layers]
        if bad:
            raise InteropError(
                f"{where}: layer(s) {bad} do not exist in {model} ({num_layers} layers, 0-{num_layers - 1}); "
                "use a vector made for this model"
            )
