"""The readout file, format version 1: ``readout.safetensors`` + ``readout.json``.

``readout.safetensors`` holds ``layer_<idx>.vectors`` [n_concepts, hidden] (unit rows, manifest
order) and optionally ``layer_<idx>.mean`` / ``layer_<idx>.std`` [n_concepts]: the projection
statistics over neutral text that turn raw scores into z-scores (raw scores are dominated by
residual-stream magnitude, which differs per layer). Optional, from builds that record them:
``layer_<idx>.emotional_mean`` / ``.emotional_std`` [n_concepts] (the same statistics over the
emotional texts' tokens), ``layer_<idx>.tracks`` [n_tracks, hidden] (unit directions read beside
the concepts: ``emotionality``, ``valence``) with ``layer_<idx>.tracks_mean`` / ``.tracks_std``
[n_tracks] over neutral text. ``readout.json``'s ``construction``, ``statistics`` and ``tracks``
say which exist (docs/readout-format.md). ``readout.json`` describes them; files
with only the original system's four keys (format_version... concepts, layers, hidden_size,
dtype) load too. ``site: block_output`` is the residual stream after decoder block ``idx``
(transformers' ``hidden_states[idx + 1]``), before any final norm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amygdala import __version__
from amygdala.readout.card import CARD, eval_figures, model_card
from amygdala.readout.files import DTYPES, FORMAT_VERSION, MANIFEST, REQUIRED, STATISTICS, TENSORS, ReadoutError, read, write

__all__ = ["DTYPES", "FORMAT_VERSION", "MANIFEST", "REQUIRED", "STATISTICS", "TENSORS", "Readout", "ReadoutError"]

@dataclass
class Readout:
    """Concept vectors per layer, with optional neutral-text projection statistics: the readout
    file (``readout.safetensors`` + ``readout.json``, docs/readout-format.md) in memory.

    Args:
        concepts: the concept names, in row order.
        layers: the decoder layers the vectors belong to, ascending.
        vectors: per layer, [n_concepts, hidden] unit rows.
        mean, std: per layer, [n_concepts] projection statistics over neutral-text tokens
            (``None``: raw projections, no z-scores).
        meta: readout.json's other fields (model, method, pooling, corpus, ...).
        emotional_mean, emotional_std: the same over the emotional texts' tokens, when built.
        track_names, track_vectors, track_mean, track_std: directions read beside the concepts.
    """

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]
    mean: dict[int, torch.Tensor] | None = None
    std: dict[int, torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)
    #: Statistics over the emotional texts' tokens (``statistics: emotional``), when the build made them.
    emotional_mean: dict[int, torch.Tensor] | None = None
    emotional_std: dict[int, torch.Tensor] | None = None
    #: Directions read beside the concepts (``emotionality``, ``valence``): names, per layer
    #: [n_tracks, hidden] unit rows and their neutral-text mean/std [n_tracks].
    track_names: list[str] = field(default_factory=list)
    track_vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    track_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    track_std: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.vectors[self.layers[0]].shape[1])

    @property
    def pooling(self) -> str:
        """How the vectors' corpus rows were pooled (``last`` for files that do not say)."""
        value = str(self.meta.get("pooling") or "last")
        return "last" if value == "last_content_token" else value

    @property
    def has_stats(self) -> bool:
        return self.mean is not None and self.std is not None

    @property
    def statistics(self) -> list[str]:
        """Which statistics sets this file holds (``neutral``, ``emotional``)."""
        out = ["neutral"] if self.has_stats else []
        if self.has_stats and self.emotional_mean is not None and self.emotional_std is not None:
            out.append("emotional")
        return out

    @property
    def default_statistics(self) -> str:
        """The set z-scores use unless told: the file's ``statistics.default``, else ``neutral``
        (files from before the choice existed were standardised on neutral text)."""
        info = self.meta.get("statistics")
        want = info.get("default") if isinstance(info, dict) else None
        return want if want in self.statistics else "neutral"

    @property
    def construction(self) -> str:
        """How the vectors were made from the method's output: ``mean_removed`` or ``as_built``."""
        return str(self.meta.get("construction") or "as_built")

    def stats_for(self, against: str | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(mean, std) per layer of the statistics ``against`` (``None``: the default)."""
        against = against or self.default_statistics
        if not self.has_stats:
            raise ReadoutError("this readout has no layer_<idx>.mean/.std statistics; z-scores need them")
        if against not in STATISTICS:
            raise ReadoutError(f"statistics {against!r}: expected one of {', '.join(STATISTICS)}")
        if against not in self.statistics:
            raise ReadoutError(
                f"this readout has no {against!r} statistics (it has {', '.join(self.statistics)}); "
                "rebuild it with this amygdala to get both"
            )
        mean, std = (self.emotional_mean, self.emotional_std) if against == "emotional" else (self.mean, self.std)
        if mean is None or std is None:  # has_stats and statistics said otherwise: not reachable
            raise ReadoutError(f"this readout has no {against!r} statistics")
        return mean, std

    def zscore(self, scores: torch.Tensor, against: str | None = None) -> torch.Tensor:
        """[..., n_layers, n_concepts] raw scores to z-scores with the statistics ``against``
        (``neutral``: is this token more X than plain prose; ``emotional``: X rather than another
        feeling; ``None``: the file's default)."""
        mean_d, std_d = self.stats_for(against)
        mean = torch.stack([mean_d[l] for l in self.layers]).to(scores)
        std = torch.stack([std_d[l] for l in self.layers]).to(scores)
        return (scores - mean) / std.clamp_min(1e-6)

    def track_zscore(self, scores: torch.Tensor) -> torch.Tensor:
        """[..., n_layers, n_tracks] raw track projections to z-scores over neutral text."""
        if not self.track_names:
            raise ReadoutError("this readout has no tracks (emotionality, valence); rebuild it with this amygdala")
        mean = torch.stack([self.track_mean[l] for l in self.layers]).to(scores)
        std = torch.stack([self.track_std[l] for l in self.layers]).to(scores)
        return (scores - mean) / std.clamp_min(1e-6)

    def concept_index(self, name: str) -> int:
        try:
            return self.concepts.index(name)
        except ValueError:
            import difflib

            near = difflib.get_close_matches(name, self.concepts, n=3, cutoff=0.0)
            raise ReadoutError(f"unknown concept {name!r}; nearest: {', '.join(near)}") from None

    def concept_info(self, key: str) -> list | None:
        """A per-concept list of the metadata (``clusters``, ``valence``, ``arousal``,
        ``descriptions``) when the file has one of the right length, else ``None``."""
        value = self.meta.get(key)
        return list(value) if isinstance(value, list) and len(value) == len(self.concepts) else None

    def manifest(self, stats: bool = True) -> dict:
        """What a client needs to show this readout: names, layers, and per concept its cluster,
        valence, arousal and description where the file records them (``GET
        /v1/readout/manifest`` and the page). ``stats``: include the neutral-text mean/std."""
        body = {
            "concepts": list(self.concepts),
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "site": self.meta.get("site", "block_output"),
            "zscore": self.has_stats,
        }
        if isinstance(self.meta.get("model"), dict) and self.meta["model"].get("name"):
            body["model"] = str(self.meta["model"]["name"])
        for key in ("clusters", "valence", "arousal", "descriptions"):
            value = self.concept_info(key)
            if value is not None:
                body[key] = value
        body["construction"] = self.construction
        if self.has_stats:
            body["statistics"] = {"available": self.statistics, "default": self.default_statistics}
        if self.track_names:
            body["tracks"] = list(self.track_names)
        if stats and self.has_stats:
            # mean/std: the default statistics, so a client that knows only these reads as `read` does.
            mean, std = self.stats_for(None)
            body["mean"] = [mean[l].tolist() for l in self.layers]
            body["std"] = [std[l].tolist() for l in self.layers]
            # Every set, so a client (the page's statistics switch) can turn z of one into z of another.
            body["statistics_sets"] = {}
            for name in self.statistics:
                m, s = self.stats_for(name)
                body["statistics_sets"][name] = {"mean": [m[l].tolist() for l in self.layers],
                                                 "std": [s[l].tolist() for l in self.layers]}
        if stats and self.track_names:
            body["tracks_mean"] = [self.track_mean[l].tolist() for l in self.layers]
            body["tracks_std"] = [self.track_std[l].tolist() for l in self.layers]
        return body

    @property
    def weights(self) -> dict | None:
        """The record of the weights this readout was built from (``model.weights``), None in older files."""
        model = self.meta.get("model")
        rec = model.get("weights") if isinstance(model, dict) else None
        return rec if isinstance(rec, dict) else None

    def check_weights(self, model_path: str | os.PathLike) -> list[str]:
        """One line per weight file of ``model_path`` that differs from this readout's record
        (empty: the same weights); raises for a file with no record, which cannot be checked."""
        from amygdala.models.weights import differences

        if self.weights is None:
            raise ReadoutError("readout.json has no model.weights record (an older file); its weights cannot be checked")
        return differences(self.weights, Path(model_path))

    def check_model(self, num_layers: int, hidden_size: int, model_name: str = "the model") -> None:
        """Raise when the file cannot fit a model with this shape (names both sides)."""
        if hidden_size != self.hidden_size:
            raise ReadoutError(
                f"readout hidden size {self.hidden_size} does not fit {model_name} (hidden size "
                f"{hidden_size}); use a readout built for this model"
            )
        bad = [l for l in self.layers if not 0 <= l < num_layers]
        if bad:
            raise ReadoutError(
                f"readout layers {bad} do not exist in {model_name} ({num_layers} layers, "
                f"0-{num_layers - 1}); use a readout built for this model"
            )

    def _repr_html_(self) -> str:
        """A compact summary table for Jupyter: what the readout is, at a glance (the model card,
        readout/card.py, is the full account)."""
        from html import escape

        model: dict = self.meta["model"] if isinstance(self.meta.get("model"), dict) else {}
        shown = ", ".join(self.concepts[:12]) + (f", ... ({len(self.concepts)} in all)" if len(self.concepts) > 12 else "")
        rows = [("concepts", shown), ("layers", ", ".join(map(str, self.layers))),
                ("method", str(self.meta.get("method") or "-")), ("pooling", self.pooling),
                ("model", str(model.get("name") or "-")), ("hidden size", str(self.hidden_size)),
                ("construction", self.construction), ("statistics", ", ".join(self.statistics) or "none")]
        body = "".join(f"<tr><th style=\"text-align:left\">{escape(k)}</th><td style=\"text-align:left\">{escape(v)}</td></tr>"
                       for k, v in rows)
        return f"<table class=\"amygdala-readout\">{body}</table>"

    # ------------------------------------------------------------------ writing
    def to_json(self) -> dict:
        meta = dict(self.meta)
        dtype = meta.pop("dtype", "float32")
        return {
            "format_version": FORMAT_VERSION,
            "concepts": list(self.concepts),
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "dtype": dtype,
            "site": "block_output",
            **meta,
            **self._choice_json(),
            "created_by": f"amygdala {__version__}",
        }

    def _choice_json(self) -> dict:
        """What readers need to know about the construction, statistics and tracks."""
        out: dict[str, Any] = {}
        if self.has_stats:
            out["statistics"] = {"available": self.statistics, "default": self.default_statistics}
        if self.track_names:
            out["tracks"] = list(self.track_names)
        return out

    def save(self, out: str | Path) -> Path:
        """Write both files into folder ``out``; a reader never sees a half-written pair.

        A new folder is built beside ``out`` and renamed into place; into an existing folder
        the two files are renamed in, the json (which readers open first) last. Two renames are
        not one atomic step, so both files carry the same ``pair`` id (the json's field, the
        safetensors metadata): :meth:`load` that catches the swap between its two reads sees
        the ids differ and reads again. The model card (``README.md``, readout/card.py) is
        rewritten with every save, carrying the same id, renamed in before the json.

        Args:
            out: the readout folder (created when missing).

        Returns:
            ``out`` as a :class:`~pathlib.Path`.
        """
        out = Path(out)
        info = self.to_json()
        dtype = DTYPES[info["dtype"]]
        tensors = {}
        for l in self.layers:
            tensors[f"layer_{l}.vectors"] = self.vectors[l].detach().to("cpu", dtype).contiguous()
            if self.mean is not None and self.std is not None:  # has_stats
                tensors[f"layer_{l}.mean"] = self.mean[l].detach().float().cpu().contiguous()
                tensors[f"layer_{l}.std"] = self.std[l].detach().float().cpu().contiguous()
            if self.emotional_mean is not None and self.emotional_std is not None and "emotional" in self.statistics:
                tensors[f"layer_{l}.emotional_mean"] = self.emotional_mean[l].detach().float().cpu().contiguous()
                tensors[f"layer_{l}.emotional_std"] = self.emotional_std[l].detach().float().cpu().contiguous()
            if self.track_names:
                tensors[f"layer_{l}.tracks"] = self.track_vectors[l].detach().float().cpu().contiguous()
                tensors[f"layer_{l}.tracks_mean"] = self.track_mean[l].detach().float().cpu().contiguous()
                tensors[f"layer_{l}.tracks_std"] = self.track_std[l].detach().float().cpu().contiguous()
        # The card is of this save: its eval figures only when the folder's eval.json evaluated these concepts.
        evaluation = eval_figures(out, self) if out.is_dir() else None
        return write(out, tensors, info, lambda done: {CARD: model_card(self, evaluation, pair=done["pair"])})

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> Readout:
        """Load and validate a readout folder (or either of its two files).

        Args:
            path: the folder, or its ``readout.json`` or ``readout.safetensors``, or a Hugging
                Face repo id (``org/name[@revision]``) in the local cache, never downloaded.

        Returns:
            The :class:`Readout`, every tensor checked for shape and finiteness.

        Raises:
            ReadoutError: a missing or damaged file or field, named with what to do.
        """
        return cls(**read(_from_hub(path)))


def _from_hub(path: str | Path) -> str | Path:
    """``path`` itself, or the cached snapshot folder when it is a repo id that is not a path
    (as models resolve one, models/hub.py: offline, so a missing readout is an error naming the
    cache and how to fill it, never a download)."""
    from amygdala.models.hub import hub_cache, looks_like_repo_id

    if not looks_like_repo_id(str(path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = str(path).partition("@")
    cache = hub_cache()
    try:
        return snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ReadoutError(
            f"readout {path}: no such folder, and not in the local Hugging Face cache {cache} (nothing is downloaded); "
            f"fill it on a machine with internet (huggingface-cli download {repo_id}, with HF_HUB_CACHE pointing at "
            f"the cache) and copy the models--{repo_id.replace('/', '--')} folder into {cache}, or pass the readout folder"
        ) from None
