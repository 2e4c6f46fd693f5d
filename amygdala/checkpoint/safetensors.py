"""The safetensors side of a model folder: headers, tensor byte ranges, weight files.

See docs/checkpoint.md for how a sync uses them.
"""


from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amygdala import AmygdalaError


BLOCK = 4096
JOURNAL = ".amygdala-sync.journal"
JOURNAL_TMP = JOURNAL + ".tmp"
SIDECAR_TMP_SUFFIX = ".amygdala-tmp"
#: The sidecar files a sync may write (and a journal may rename into place): the optimizer state
#: (:data:`amygdala.finetune.state.STATE_FILE`). A journal naming any other file is refused.
SIDECARS = frozenset({"amygdala-optimizer.pt"})
MAGIC = b"AMYJRNL2"
OLD_MAGIC = b"AMYJRNL1"  # no file records: replayed without the check
LOCK_FILE = ".amygdala-train.lock"
#: Seconds a writer waits for the folder's lock before it gives up (a sync takes seconds).
LOCK_WAIT_S = 30.0
_CHUNK = 1 << 24  # bytes compared at a time: bounds the memory of a comparison

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}




class CheckpointError(AmygdalaError):
    """A model folder, journal or set of served tensors that a sync cannot use."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: absolute byte range in the file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class SyncReport:
    """What a sync (or a dry comparison) found and wrote."""

    tensors_changed: list[str] = field(default_factory=list)
    blocks: int = 0
    bytes_written: int = 0  # into the model files (blocks * 4 KiB, less at a file's end)
    journal_bytes: int = 0
    sidecars: list[str] = field(default_factory=list)
    replayed_blocks: int | None = None  # a leftover journal replayed first, with this many blocks
    seconds: float = 0.0

    def summary(self) -> str:
        replayed = f"; first replayed a pending journal ({self.replayed_blocks} blocks)" if self.replayed_blocks is not None else ""
        extra = f" + {', '.join(self.sidecars)}" if self.sidecars else ""
        return (f"{len(self.tensors_changed)} tensor(s) changed: {self.blocks} block(s), {self.bytes_written} bytes "
                f"written{extra} in {self.seconds:.2f} s{replayed}")


# --------------------------------------------------------------------------- safetensors headers
def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, with absolute offsets; raises on a malformed file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: shorter than a safetensors header; the file is damaged")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes); not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: the header is not JSON; not a safetensors file") from None
    base = 8 + n
    out: dict[str, Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which sync does not handle")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {base + end}, past the file's end ({size}); truncated")
        out[name] = Entry(path.name, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end)
    return out


def _check_folder(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder; give the model folder (with config.json and *.safetensors)")


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors weight files (the index's shards, else every *.safetensors)."""
    _check_folder(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__})") from None
        for n in names:  # a shared folder's index must not point a sync outside the folder
            if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors"):
                raise CheckpointError(f"{index}: weight file {n!r} is not a plain *.safetensors name in the folder")
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files; is this a model folder?")
    return files


def file_stamp(path: Path) -> tuple[int, bytes]:
    """(size, SHA-256 of the safetensors header): what a journal's blocks were computed against."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        return os.fstat(f.fileno()).st_size, hashlib.sha256(raw + f.read(min(n, 100 << 20))).digest()


def read_entries(model_dir: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for path in weight_files(model_dir):
        entries.update(read_header(path))
    return entries


def _tied(model_dir: Path) -> bool:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text())
    return bool(cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", False)))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of every weight file of a folder (for the CLI's --from)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = weight_files(path) if path.is_dir() else [path]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: no such safetensors file")
        read_header(f)  # a clear error for a damaged file, before safetensors' own
        out.update(load_file(f))
    return out
