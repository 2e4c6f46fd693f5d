"""Which format a file is, by its bytes, and one write/read entry point for all of them.

Detection is by content, not extension: a GGUF starts with ``GGUF``, ``torch.save`` writes a
zip, a plain pickle starts with the PROTO opcode. A file that is none of these, or holds
something other than a steering vector, gets one line naming the file and what it held.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile
from pathlib import Path

from amygdala.interop import gguf, pickles, repeng, steering_vectors
from amygdala.interop.vectors import InteropError, LayerVectors, check_format

WRITERS = {"gguf": gguf.write, "repeng": repeng.write, "steering-vectors": steering_vectors.write}


def write_vectors(vectors: LayerVectors, path: str | Path, fmt: str) -> Path:
    """Write ``vectors`` in format ``fmt`` (one of :data:`~amygdala.interop.vectors.FORMATS`)."""
    return WRITERS[check_format(fmt)](vectors, Path(path))


def sniff(path: Path) -> str:
    """``gguf``, ``zip`` (torch.save) or ``pickle``; raises for anything else."""
    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == gguf.MAGIC:
        return "gguf"
    if pickles._is_zip(path):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    raise InteropError(
        f"{path}: not a control vector file (expected a GGUF control vector, a torch.save'd SteeringVector "
        "or a pickled repeng ControlVector)"
    )


def read_vectors(path: str | Path) -> tuple[LayerVectors, str]:
    """(the file's layer vectors, the format they were read as: ``gguf``, ``repeng`` or ``steering-vectors``)."""
    path = Path(path)
    kind = sniff(path)
    if kind == "gguf":
        vectors = gguf.read(path)
        return vectors, "gguf"
    try:
        obj = pickles.load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError, KeyError, IndexError,
            LookupError, RecursionError, MemoryError, OverflowError, OSError, struct.error, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"{path}: not a steering vector that can be loaded safely ({first})") from None
    for reader, fmt in ((steering_vectors.from_object, "steering-vectors"), (repeng.from_object, "repeng")):
        vectors = reader(obj, str(path))
        if vectors is not None:
            return vectors, fmt
    raise InteropError(
        f"{path}: holds a {type(obj).__name__}, not a SteeringVector, a {{layer: tensor}} dict or a repeng ControlVector"
    )


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
