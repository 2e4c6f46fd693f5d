"""The readout file, format version 1: ``readout.safetensors`` + ``readout.json``.

``readout.safetensors`` holds ``layer_<idx>.vectors`` [n_concepts, hidden] (unit rows, manifest
order) and optionally ``layer_<idx>.mean`` / ``layer_<idx>.std`` [n_concepts]: the projection
statistics over neutral text that turn raw scores into z-scores (raw scores are dominated by
residual-stream magnitude, which differs per layer). ``readout.json`` describes them; files
with only the original system's four keys (format_version... concepts, layers, hidden_size,
dtype) load too. ``site: block_output`` is the residual stream after decoder block ``idx``
(transformers' ``hidden_states[idx + 1]``), before any final norm.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from amygdala import AmygdalaError, __version__

FORMAT_VERSION = 1
TENSORS = "readout.safetensors"
MANIFEST = "readout.json"
REQUIRED = ("concepts", "layers", "hidden_size", "dtype")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ReadoutError(AmygdalaError):
    """A readout file that cannot be used; the message names the file and field."""


@dataclass
class Readout:
    """Concept vectors per layer, with optional neutral-text projection statistics."""

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, torch.Tensor]
    mean: dict[int, torch.Tensor] | None = None
    std: dict[int, torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)

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

    def zscore(self, scores: torch.Tensor) -> torch.Tensor:
        """[..., n_layers, n_concepts] raw scores to z-scores with the neutral-text statistics."""
        if not self.has_stats:
            raise ReadoutError("this readout has no layer_<idx>.mean/.std statistics; z-scores need them")
        mean = torch.stack([self.mean[l] for l in self.layers]).to(scores)
        std = torch.stack([self.std[l] for l in self.layers]).to(scores)
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
        if stats and self.has_stats:
            body["mean"] = [self.mean[l].tolist() for l in self.layers]
            body["std"] = [self.std[l].tolist() for l in self.layers]
        return body

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
            "created_by": f"amygdala {__version__}",
        }

    def save(self, out: str | Path) -> Path:
        """Write both files into folder ``out``; a reader never sees a half-written pair.

        A new folder is built beside ``out`` and renamed into place; into an existing folder
        the two files are renamed in, the json (which readers open first) last.
        """
        out = Path(out)
        info = self.to_json()
        dtype = DTYPES[info["dtype"]]
        tensors = {}
        for l in self.layers:
            tensors[f"layer_{l}.vectors"] = self.vectors[l].detach().to("cpu", dtype).contiguous()
            if self.has_stats:
                tensors[f"layer_{l}.mean"] = self.mean[l].detach().float().cpu().contiguous()
                tensors[f"layer_{l}.std"] = self.std[l].detach().float().cpu().contiguous()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            save_file(tensors, tmp / TENSORS, metadata={"format_version": str(FORMAT_VERSION)})
            (tmp / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
            if not out.exists():
                tmp.rename(out)
            else:
                os.replace(tmp / TENSORS, out / TENSORS)
                os.replace(tmp / MANIFEST, out / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> Readout:
        """Load and validate a readout folder (or either of its two files)."""
        path = Path(path)
        folder = path.parent if path.name in (TENSORS, MANIFEST) else path
        jpath, tpath = folder / MANIFEST, folder / TENSORS
        for p in (jpath, tpath):
            if not p.is_file():
                raise ReadoutError(f"{p}: missing; a readout is a folder with {MANIFEST} and {TENSORS}")
        try:
            info = json.loads(jpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReadoutError(f"{jpath}: not valid JSON ({e}); re-run amygdala build") from None
        if not isinstance(info, dict):
            raise ReadoutError(f"{jpath}: must be a JSON object")
        missing = [k for k in REQUIRED if k not in info]
        if missing:
            raise ReadoutError(f"{jpath}: missing field(s) {', '.join(missing)}")
        version = info.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ReadoutError(f"{jpath}: format_version {version}; this amygdala reads version {FORMAT_VERSION}")
        concepts, layers, hidden = info["concepts"], info["layers"], info["hidden_size"]
        if not (isinstance(concepts, list) and concepts and all(isinstance(c, str) for c in concepts)):
            raise ReadoutError(f"{jpath}: field concepts must be a non-empty list of names")
        if len(set(concepts)) != len(concepts):
            raise ReadoutError(f"{jpath}: field concepts has duplicate names")
        if not (isinstance(layers, list) and layers and all(isinstance(l, int) for l in layers)):
            raise ReadoutError(f"{jpath}: field layers must be a non-empty list of integers")
        if not isinstance(hidden, int) or hidden <= 0:
            raise ReadoutError(f"{jpath}: field hidden_size must be a positive integer")
        if info["dtype"] not in DTYPES:
            raise ReadoutError(f"{jpath}: field dtype {info['dtype']!r}; expected one of {', '.join(DTYPES)}")
        try:
            tensors = load_file(tpath)
        except (SafetensorError, OSError, ValueError) as e:
            raise ReadoutError(f"{tpath}: damaged safetensors file ({e}); re-run amygdala build") from None
        vectors, mean, std = {}, {}, {}
        for l in layers:
            key = f"layer_{l}.vectors"
            if key not in tensors:
                raise ReadoutError(f"{tpath}: no tensor {key} although {MANIFEST} lists layer {l}")
            v = tensors[key].float()
            if tuple(v.shape) != (len(concepts), hidden):
                raise ReadoutError(
                    f"{tpath}: {key} has shape {tuple(v.shape)}, expected "
                    f"({len(concepts)}, {hidden}) from {MANIFEST}"
                )
            if not torch.isfinite(v).all():
                raise ReadoutError(f"{tpath}: {key} holds NaN or inf values")
            vectors[l] = v
            for name, store in (("mean", mean), ("std", std)):
                t = tensors.get(f"layer_{l}.{name}")
                if t is not None:
                    if tuple(t.shape) != (len(concepts),):
                        raise ReadoutError(f"{tpath}: layer_{l}.{name} has shape {tuple(t.shape)}, expected ({len(concepts)},)")
                    store[l] = t.float()
        has_stats = len(mean) == len(layers) and len(std) == len(layers)
        meta = {k: v for k, v in info.items() if k not in (*REQUIRED, "format_version", "created_by")}
        meta["dtype"] = info["dtype"]
        return cls(
            concepts=list(concepts),
            layers=list(layers),
            vectors=vectors,
            mean=mean if has_stats else None,
            std=std if has_stats else None,
            meta=meta,
        )
