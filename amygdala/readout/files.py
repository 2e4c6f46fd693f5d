"""Reading and writing the readout's two files: where bytes from disk become checked tensors.

Apart from :mod:`amygdala.readout.format` (the :class:`Readout` a caller holds) because a readout
folder may come from a stranger: every field and tensor is checked here, in one place, before a
:class:`Readout` exists, and a save pairs its two files so a concurrent reader never mixes two saves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from amygdala import AmygdalaError

FORMAT_VERSION = 1
TENSORS = "readout.safetensors"
MANIFEST = "readout.json"
REQUIRED = ("concepts", "layers", "hidden_size", "dtype")
#: The z-score statistics a readout can hold: over neutral text ("is this token more X than plain
#: prose?", ``layer_<idx>.mean/.std``) and over emotional text ("X rather than another feeling?",
#: ``layer_<idx>.emotional_mean/.emotional_std``).
STATISTICS = ("neutral", "emotional")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ReadoutError(AmygdalaError):
    """A readout file that cannot be used; the message names the file and field."""


def write(out: Path, tensors: dict[str, torch.Tensor], info: dict,
          beside: Callable[[dict], dict[str, str]] | None = None) -> Path:
    """Write one save's two files into folder ``out`` (see :meth:`Readout.save` for why a reader
    never pairs two saves): both get a fresh ``pair`` id, ``info`` is updated with it.
    ``beside(info)``: text files of the same save (the model card), given ``info`` with its id;
    renamed in before the json, so a reader who sees the new json sees them too."""
    pair = info["pair"] = uuid.uuid4().hex
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(tensors, tmp / TENSORS, metadata={"format_version": str(FORMAT_VERSION), "pair": pair})
        extra = beside(info) if beside is not None else {}
        for name, text in extra.items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
        if not out.exists():
            tmp.rename(out)
        else:
            os.replace(tmp / TENSORS, out / TENSORS)
            for name in extra:
                os.replace(tmp / name, out / name)
            os.replace(tmp / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read(path: str | Path) -> dict[str, Any]:
    """The checked contents of a readout folder (or either of its files), as the keyword
    arguments of :class:`Readout`; every tensor checked for shape and finiteness."""
    path = Path(path)
    folder = path.parent if path.name in (TENSORS, MANIFEST) else path
    jpath, tpath = folder / MANIFEST, folder / TENSORS
    for p in (jpath, tpath):
        if not p.is_file():
            raise ReadoutError(f"{p}: missing; a readout is a folder with {MANIFEST} and {TENSORS}")
    info, tensors = _read_pair(jpath, tpath)
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
    vectors: dict[int, torch.Tensor] = {}
    mean: dict[int, torch.Tensor] = {}
    std: dict[int, torch.Tensor] = {}
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
    emo_mean = _per_layer(tensors, tpath, layers, "emotional_mean", (len(concepts),))
    emo_std = _per_layer(tensors, tpath, layers, "emotional_std", (len(concepts),))
    track_names = info.get("tracks") or []
    if not (isinstance(track_names, list) and all(isinstance(t, str) for t in track_names)):
        raise ReadoutError(f"{jpath}: field tracks must be a list of names")
    tracks: dict[str, dict[int, torch.Tensor]] = {}
    if track_names:
        k = len(track_names)
        tracks = {name: _per_layer(tensors, tpath, layers, name, shape, required=True) or {}
                  for name, shape in (("tracks", (k, hidden)), ("tracks_mean", (k,)), ("tracks_std", (k,)))}
    meta = {k: v for k, v in info.items() if k not in (*REQUIRED, "format_version", "created_by", "tracks")}
    meta["dtype"] = info["dtype"]
    return dict(
        concepts=list(concepts),
        layers=list(layers),
        vectors=vectors,
        mean=mean if has_stats else None,
        std=std if has_stats else None,
        meta=meta,
        emotional_mean=emo_mean if has_stats else None,
        emotional_std=emo_std if has_stats else None,
        track_names=list(track_names),
        track_vectors=tracks.get("tracks", {}),
        track_mean=tracks.get("tracks_mean", {}),
        track_std=tracks.get("tracks_std", {}),
    )


def _per_layer(tensors: dict[str, torch.Tensor], tpath: Path, layers: list[int], name: str, shape: tuple[int, ...],
               required: bool = False) -> dict[int, torch.Tensor] | None:
    """``layer_<idx>.<name>`` for every layer, checked for shape and finiteness; ``None`` when the
    file has it for no layer (and it is not ``required``)."""
    found = {l: tensors[f"layer_{l}.{name}"] for l in layers if f"layer_{l}.{name}" in tensors}
    if not found and not required:
        return None
    for l in layers:
        t = found.get(l)
        if t is None:
            raise ReadoutError(f"{tpath}: no tensor layer_{l}.{name} although other layers have it; re-run amygdala build")
        if tuple(t.shape) != shape:
            raise ReadoutError(f"{tpath}: layer_{l}.{name} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ReadoutError(f"{tpath}: layer_{l}.{name} holds NaN or inf values")
    return {l: t.float() for l, t in found.items()}


def _read_pair(jpath: Path, tpath: Path, tries: int = 20) -> tuple[dict, dict]:
    """The json and the tensors of one save: a save into an existing folder renames the two files
    one after the other, so a reader between the renames would pair the old json with the new
    tensors. Both carry the save's ``pair`` id; on a mismatch read both again (a save's renames
    take microseconds). A file without the id (from before it, or written by another tool) is taken as it is."""
    for attempt in range(tries):
        try:
            info = json.loads(jpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReadoutError(f"{jpath}: not valid JSON ({e}); re-run amygdala build") from None
        if not isinstance(info, dict):
            raise ReadoutError(f"{jpath}: must be a JSON object")
        try:
            with safe_open(tpath, "pt") as f:  # one open: the metadata and the tensors of the same file
                pair = (f.metadata() or {}).get("pair")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ReadoutError(f"{tpath}: damaged safetensors file ({e}); re-run amygdala build") from None
        if info.get("pair") is None or pair is None or info["pair"] == pair:  # no id: a file from before it, or written by hand
            return info, tensors
        time.sleep(0.01 * (attempt + 1))
    raise ReadoutError(f"{jpath} and {tpath} are from different saves (pair {info.get('pair')} vs {pair}) and stayed so: "
                       "another process is writing this readout; wait for it, or rebuild")
