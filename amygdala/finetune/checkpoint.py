"""The model folder is the checkpoint: write back only the 4 KiB blocks that training changed.

Why blocks: an online update touches some weights by tiny amounts; rewriting a multi-GB folder
after each job costs minutes of disk bandwidth, while comparing through mmap and writing the
changed blocks costs what changed. Why a journal: a kill -9 (or power loss) in the middle of
writing must leave a folder that loads with every tensor wholly old or wholly new.

A sync, :func:`sync`:

1. Served tensors (vLLM's names, merged ``qkv_proj``/``gate_up_proj``; or already the
   checkpoint's names) become views under the checkpoint's names (:mod:`amygdala.finetune.layout`).
   A served dtype other than the file's (bf16 served from an fp32 folder) is cast, keeping the
   file's value wherever it still rounds to the served value, so untouched weights keep their
   full precision.
2. Each tensor's bytes are compared with the safetensors file through mmap in 4 KiB blocks of
   the file; the new contents of changed blocks (and the small ``sidecars`` files, e.g. the
   optimizer state) go to ``.amygdala-sync.journal.tmp``, which is fsynced and renamed to
   ``.amygdala-sync.journal`` (the commit point), and the folder is fsynced.
3. The blocks are written into the files in place and fsynced; sidecars are renamed into place.
4. The journal is removed.

The header of a safetensors file never changes (same names, shapes, offsets), so the files
always parse. :func:`recover` replays a committed journal (every block write is idempotent) and
removes uncommitted leftovers: after it, every tensor and sidecar is entirely from before or
entirely from after the interrupted sync. Call it before loading a model folder that a sync
may have been writing (:func:`sync` and the Trainer do; :func:`diagnose` only reports).

One writer at a time: :func:`sync` and :func:`recover` hold the folder's writer lock
(:func:`writer_lock`, an ``flock`` on ``.amygdala-train.lock`` that the training worker also
holds for its life), so the CLI, the server's start-up and the worker never write together.
A tensor that is not finite (NaN or inf) is never written: the sync is refused before its
commit point and the folder keeps its last good state.

Journal format: ``b"AMYJRNL2"``, records, then a trailer. Record ``F``: u16 file-name length,
name, u64 file size, 32-byte SHA-256 of the file's safetensors header (length and JSON): the
files the journal was written against, before any block of them; a replay onto files that
differ is refused. Record ``B``: u16 file-name length, name, u64 offset, u64 length, bytes (the
new contents of a run of consecutive blocks). Record ``R``: u16 + staged sidecar name, u16 +
final name (a rename). Trailer ``E``: u64 count of bytes before it and their CRC-32 (integers
little-endian). A ``AMYJRNL1`` journal (no ``F`` records, from an older amygdala) is replayed
unchecked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from amygdala import AmygdalaError
from amygdala.finetune.layout import LayoutError, placements, to_checkpoint

BLOCK = 4096
JOURNAL = ".amygdala-sync.journal"
JOURNAL_TMP = JOURNAL + ".tmp"
SIDECAR_TMP_SUFFIX = ".amygdala-tmp"
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


# --------------------------------------------------------------------------- the writer lock
_held: dict[str, int] = {}  # folders this process holds the lock of -> nesting depth
_held_guard = threading.Lock()


class FolderBusy(CheckpointError):
    """Another process holds the folder's writer lock past the wait."""


@contextlib.contextmanager
def writer_lock(model_dir: str | os.PathLike, *, wait: float = LOCK_WAIT_S, holder: str = "writer") -> Iterator[None]:
    """Hold the folder's writer lock: one writer (server start-up, training worker, CLI) at a time.

    Waits up to ``wait`` seconds, then raises :class:`FolderBusy` naming the holder (``holder``
    is what this process writes into the lock file for others to read). Re-entrant within a
    process: the worker holds it for its life and its syncs take it again. The lock dies with
    its process, so a writer killed mid-sync never leaves it stale.
    """
    model_dir = Path(model_dir)
    key = os.path.realpath(model_dir)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    _check_folder(model_dir)
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid, _, who = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
                    raise FolderBusy(
                        f"{model_dir}: another {who or 'writer'} (pid {pid or '?'}) holds this model folder "
                        f"({LOCK_FILE}; waited {wait:g} s); stop that server or let its sync finish, or serve a "
                        "copy of the folder") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}".encode(), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # releases the lock


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors weight files (the index's shards, else every *.safetensors)."""
    _check_folder(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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


def checkpoint_views(model_dir: Path, served: Mapping[str, torch.Tensor], entries: Mapping[str, Entry]) -> dict[str, torch.Tensor]:
    """``served`` as views under the folder's tensor names; every name on both sides must match."""
    shapes = {name: e.shape for name, e in entries.items()}
    tied = _tied(model_dir)
    try:
        views = to_checkpoint(served, shapes, tied=tied)
    except LayoutError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    used = {rows.name for rows in placements(served, shapes, tied=tied).values()}
    extra = sorted(n for n in served if n not in used and not (tied and n.endswith("lm_head.weight")))
    if extra:
        raise CheckpointError(
            f"{model_dir}: served tensor(s) {', '.join(extra[:5])} have no counterpart in the folder's safetensors"
        )
    return views


# --------------------------------------------------------------------------- comparison
def _new_bytes(new: torch.Tensor, entry: Entry, old: np.ndarray) -> np.ndarray:
    """The bytes ``new`` should have in the file (file dtype; file precision kept where unchanged).

    A CPU tensor is read in place, not copied: nothing may write the served tensors while a
    sync runs (the trainer runs no job then); inference reading them is fine.
    """
    t = new.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype != entry.dtype:
        before = torch.from_numpy(old.copy()).view(entry.dtype).view(entry.shape)
        t = torch.where(before.to(t.dtype) == t, before, t.to(entry.dtype))
    return t.view(-1).view(torch.uint8).numpy()


def _changed_blocks(old: np.ndarray, new: np.ndarray, start: int) -> np.ndarray:
    """File block indices where ``old`` and ``new`` (both the bytes at file offset ``start``) differ.

    Whole blocks are compared 8 bytes at a time, in chunks, so the cost is one pass over the
    bytes and the memory a chunk's worth of flags.
    """
    n = len(new)
    head = min((-start) % BLOCK, n)  # bytes before the first block boundary
    body = head + (n - head) // BLOCK * BLOCK
    found = []
    if head and not np.array_equal(old[:head], new[:head]):
        found.append(np.array([start // BLOCK]))
    for pos in range(head, body, _CHUNK):
        stop = min(pos + _CHUNK, body)
        a = old[pos:stop].view(np.uint64).reshape(-1, BLOCK // 8)
        b = new[pos:stop].view(np.uint64).reshape(-1, BLOCK // 8)
        found.append(np.flatnonzero((a != b).any(axis=1)) + (start + pos) // BLOCK)
    if body < n and not np.array_equal(old[body:], new[body:]):
        found.append(np.array([(start + body) // BLOCK]))
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def _changes(model_dir: Path, views: Mapping[str, torch.Tensor], entries: Mapping[str, Entry]) -> Iterator[tuple[mmap.mmap, Entry, str, np.ndarray, np.ndarray]]:
    """Per changed tensor, in file order: (its file's mmap, entry, name, new bytes, changed blocks).

    One tensor's new bytes are alive at a time, so memory stays at the largest tensor.
    """
    by_file: dict[str, list[str]] = {}
    for name, e in entries.items():
        if e.end > e.start:
            by_file.setdefault(e.file, []).append(name)
    for file, names in sorted(by_file.items()):
        names.sort(key=lambda n: entries[n].start)
        with open(model_dir / file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name in names:
                e = entries[name]
                old = np.frombuffer(mm, np.uint8, e.end - e.start, e.start)
                new = _new_bytes(views[name], e, old)
                blocks = _changed_blocks(old, new, e.start)
                del old  # the mmap cannot close while a view of it lives
                if len(blocks):
                    yield mm, e, name, new, blocks


class _Blocks:
    """Turns per-tensor changes into runs of whole new blocks, merging a block two tensors share.

    Consecutive changed blocks go out as one run (one journal record, one write). A block may
    hold the end of one tensor and the start of the next (or header bytes): it starts from the
    file's contents and gets each changed tensor's bytes laid over it. Only a tensor's last
    block can reach into the next tensor, so that one waits (``pending``) until the next
    tensor has been seen.
    """

    def __init__(self, emit):
        self.emit = emit  # emit(file, offset, data): data is whole blocks (a file's last may be short)
        self.pending: tuple[str, int, bytearray] | None = None

    def add(self, mm: mmap.mmap, e: Entry, new: np.ndarray, blocks: np.ndarray) -> None:
        if self.pending and (self.pending[0] != e.file or self.pending[1] != int(blocks[0])):
            self.flush()
        for run in np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1):
            first, last = int(run[0]) * BLOCK, int(run[-1]) * BLOCK
            end = min(last + BLOCK, len(mm))
            inner = first
            if first < e.start or (self.pending and self.pending[1] * BLOCK == first):
                self._edge(mm, e, new, first)
                inner = first + BLOCK
            last_is_edge = end > e.end and last >= inner
            stop = last if last_is_edge else end
            if stop > inner:  # blocks wholly inside the tensor: straight from its bytes
                self.emit(e.file, inner, new[inner - e.start : stop - e.start].data)
            if last_is_edge:
                self._edge(mm, e, new, last)

    def _edge(self, mm: mmap.mmap, e: Entry, new: np.ndarray, lo: int) -> None:
        """A block with bytes outside this tensor: file (or held) contents + this tensor's bytes.

        Held back when it reaches past the tensor's end, where the next tensor may change it.
        """
        hi = min(lo + BLOCK, len(mm))
        if self.pending and self.pending[1] * BLOCK == lo:
            buf, self.pending = self.pending[2], None
        else:
            buf = bytearray(mm[lo:hi])
        a, z = max(lo, e.start), min(hi, e.end)
        buf[a - lo : z - lo] = new[a - e.start : z - e.start].data
        if hi > e.end:
            self.pending = (e.file, lo // BLOCK, buf)
        else:
            self.emit(e.file, lo, memoryview(buf))

    def flush(self) -> None:
        if self.pending:
            file, b, buf = self.pending
            self.pending = None
            self.emit(file, b * BLOCK, memoryview(buf))


# --------------------------------------------------------------------------- journal
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<H", len(raw)) + raw


class _JournalWriter:
    """Writes a journal in its folder; its first records stamp the folder's weight files."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.crc = 0
        self.size = 0
        self._write(MAGIC)
        for weights in weight_files(path.parent):
            size, digest = file_stamp(weights)
            self._write(b"F" + _name(weights.name) + struct.pack("<Q", size) + digest)

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)

    def block(self, file: str, offset: int, data: bytes | memoryview) -> None:
        self._write(b"B" + _name(file) + struct.pack("<QQ", offset, len(data)))
        self._write(data)

    def rename(self, tmp: str, final: str) -> None:
        self._write(b"R" + _name(tmp) + _name(final))

    def close(self) -> int:
        self.f.write(b"E" + struct.pack("<QI", self.size, self.crc))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.size + 13


def _read_name(f) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n).decode()


def _records(path: Path) -> Iterator[tuple]:
    """The journal's records, after checking its trailer:
    ("F", file, size, header hash) | ("B", file, offset, data) | ("R", tmp, final)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < len(MAGIC) + 13 or f.read(len(MAGIC)) not in (MAGIC, OLD_MAGIC):
            raise CheckpointError(f"{path}: not an amygdala sync journal (bad magic); move it away to load the folder")
        f.seek(size - 13)
        tag, (body, crc) = f.read(1), struct.unpack("<QI", f.read(12))
        f.seek(0)
        check = 0
        left = body
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                break
            check = zlib.crc32(chunk, check)
            left -= len(chunk)
        if tag != b"E" or body != size - 13 or check != crc:
            raise CheckpointError(
                f"{path}: journal checksum mismatch; the folder may hold a partly applied sync. "
                "Restore the folder from a copy (the journal cannot be trusted)"
            )
        f.seek(len(MAGIC))
        while f.tell() < body:
            kind = f.read(1)
            if kind == b"B":
                file = _read_name(f)
                offset, n = struct.unpack("<QQ", f.read(16))
                yield "B", file, offset, f.read(n)
            elif kind == b"R":
                yield "R", _read_name(f), _read_name(f)
            elif kind == b"F":
                file = _read_name(f)
                (file_size,) = struct.unpack("<Q", f.read(8))
                yield "F", file, file_size, f.read(32)
            else:
                raise CheckpointError(f"{path}: unknown journal record {kind!r} at byte {f.tell() - 1}")


def _apply(model_dir: Path, journal: Path) -> tuple[int, int]:
    """Write every record of a committed journal into the folder; (blocks, bytes)."""
    fds: dict[str, int] = {}
    blocks = written = 0
    renames = []
    with open(journal, "rb") as f:
        checked = None if f.read(len(MAGIC)) == OLD_MAGIC else set()  # files whose stamp matched
    try:
        for record in _records(journal):
            if record[0] == "F":
                _check_stamp(model_dir, journal, *record[1:])
                checked.add(record[1])
            elif record[0] == "B":
                _, file, offset, data = record
                if checked is not None and file not in checked:
                    raise CheckpointError(f"{journal}: blocks for {file} without its file record; move the journal away")
                if file not in fds:
                    fds[file] = os.open(model_dir / file, os.O_WRONLY)
                view = memoryview(data)
                while view:  # one pwrite may write less (Linux caps a write near 2 GiB)
                    n = os.pwrite(fds[file], view, offset)
                    view, offset = view[n:], offset + n
                blocks += -(-len(data) // BLOCK)
                written += len(data)
            else:
                renames.append(record[1:])
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    for tmp, final in renames:
        if (model_dir / tmp).exists():  # already renamed by an earlier, interrupted replay
            os.replace(model_dir / tmp, model_dir / final)
    _fsync_dir(model_dir)
    return blocks, written


def _check_stamp(model_dir: Path, journal: Path, file: str, size: int, digest: bytes) -> None:
    """Refuse to replay onto a file other than the one the journal was written against."""
    path = model_dir / file
    if not path.is_file() or file_stamp(path) != (size, digest):
        found = "is missing" if not path.is_file() else f"differs (size {path.stat().st_size}, header changed or not)"
        raise CheckpointError(
            f"{journal}: written against {file} of {size} bytes, but that file {found}; the journal belongs to other "
            "files and was not replayed. Put the original files back, or move the journal away to load the folder as it is")


def recover(model_dir: str | os.PathLike, *, wait: float = LOCK_WAIT_S) -> int | None:
    """Finish or undo an interrupted sync. Returns the blocks replayed (None: nothing pending).

    Waits up to ``wait`` seconds for the folder's writer lock (:class:`FolderBusy` after)."""
    model_dir = Path(model_dir)
    _check_folder(model_dir)
    with writer_lock(model_dir, wait=wait, holder="checkpoint recovery"):
        return _recover(model_dir)


def _recover(model_dir: Path) -> int | None:
    replayed = None
    journal = model_dir / JOURNAL
    if journal.exists():
        replayed, _ = _apply(model_dir, journal)
        journal.unlink()
    leftovers = [p for p in [model_dir / JOURNAL_TMP, *model_dir.glob(f"*{SIDECAR_TMP_SUFFIX}")] if p.exists()]
    for leftover in leftovers:  # written before the commit point: that sync never happened
        leftover.unlink()
    if replayed is not None or leftovers:
        _fsync_dir(model_dir)
    return replayed


# --------------------------------------------------------------------------- sync / diagnose
def sync(
    model_dir: str | os.PathLike,
    served: Mapping[str, torch.Tensor],
    *,
    sidecars: Mapping[str, bytes] | None = None,
    wait: float = LOCK_WAIT_S,
) -> SyncReport:
    """Write ``served`` into the folder's safetensors files, changed 4 KiB blocks only, crash-safe.

    ``sidecars``: small files (name -> contents) written in the same transaction, e.g. the
    optimizer state (:mod:`amygdala.finetune.state`). Nothing may write to ``served`` during the
    call (the trainer runs no job while it syncs); inference reading it is fine. Waits up to
    ``wait`` seconds for the folder's writer lock; refuses a non-finite tensor before writing.
    """
    model_dir = Path(model_dir)
    _check_folder(model_dir)
    with writer_lock(model_dir, wait=wait, holder="checkpoint sync"):
        return _sync(model_dir, served, sidecars)


def _refuse_non_finite(model_dir: Path, name: str, tensor: torch.Tensor) -> None:
    """A NaN or inf must never reach the folder: it would be served after every restart."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{model_dir}: served tensor {name} has {bad} non-finite value(s); the sync was refused and the folder "
            "keeps its last good state (the served weights are damaged: restart the server to serve the folder)")


def _sync(model_dir: Path, served: Mapping[str, torch.Tensor], sidecars: Mapping[str, bytes] | None) -> SyncReport:
    t0 = time.perf_counter()
    report = SyncReport(replayed_blocks=_recover(model_dir))
    entries = read_entries(model_dir)
    views = checkpoint_views(model_dir, served, entries)
    sidecars = dict(sidecars or {})
    for name in sidecars:
        if "/" in name or name.startswith(".") or name.endswith(".safetensors"):
            raise CheckpointError(f"sidecar {name!r}: must be a plain file name in the folder, not a weight file")

    tmp = model_dir / JOURNAL_TMP
    writer = _JournalWriter(tmp)
    try:
        def emit(file: str, offset: int, data: memoryview) -> None:
            writer.block(file, offset, data)
            report.blocks += -(-len(data) // BLOCK)
            report.bytes_written += len(data)

        blocks = _Blocks(emit)
        for mm, e, name, new, changed in _changes(model_dir, views, entries):
            _refuse_non_finite(model_dir, name, views[name])
            report.tensors_changed.append(name)
            blocks.add(mm, e, new, changed)
        blocks.flush()
        for name, data in sidecars.items():
            staged = name + SIDECAR_TMP_SUFFIX
            with open(model_dir / staged, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            writer.rename(staged, name)
            report.sidecars.append(name)
        report.journal_bytes = writer.close()
    except BaseException:
        writer.f.close()
        tmp.unlink(missing_ok=True)
        for name in sidecars:
            (model_dir / (name + SIDECAR_TMP_SUFFIX)).unlink(missing_ok=True)
        raise
    if report.blocks == 0 and not sidecars:
        tmp.unlink()
        report.journal_bytes = 0
    else:
        os.replace(tmp, model_dir / JOURNAL)  # the commit point
        _fsync_dir(model_dir)
        _apply(model_dir, model_dir / JOURNAL)
        (model_dir / JOURNAL).unlink()
        _fsync_dir(model_dir)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class Diagnosis:
    """The state of a model folder as a checkpoint (``amygdala checkpoint diagnose``)."""

    files: dict[str, int]  # weight file -> tensors
    pending_journal: dict | None  # {"blocks", "bytes", "files", "renames"} of a committed journal
    journal_error: str | None
    leftovers: list[str]  # uncommitted temporaries (recover() removes them)
    differs: SyncReport | None  # against the given served tensors, when given

    def lines(self) -> list[str]:
        out = [f"{file}: {n} tensors" for file, n in sorted(self.files.items())]
        if self.pending_journal:
            j = self.pending_journal
            out.append(f"pending journal {JOURNAL}: {j['blocks']} block(s), {j['bytes']} bytes for "
                       f"{', '.join(j['files']) or 'no weight file'}{'; renames ' + ', '.join(j['renames']) if j['renames'] else ''}"
                       " (a sync was interrupted; `amygdala checkpoint sync` replays it)")
        if self.journal_error:
            out.append(f"unusable journal: {self.journal_error}")
        if self.leftovers:
            out.append(f"uncommitted leftovers (removed by the next sync): {', '.join(self.leftovers)}")
        if self.differs is not None:
            d = self.differs
            out.append(f"{len(d.tensors_changed)} tensor(s) differ ({d.blocks} block(s))"
                       + (": " + ", ".join(d.tensors_changed[:10]) + (" ..." if len(d.tensors_changed) > 10 else "") if d.tensors_changed else ""))
        out.append("clean" if self.clean else "not clean")
        return out

    @property
    def clean(self) -> bool:
        return (
            self.pending_journal is None and self.journal_error is None and not self.leftovers
            and (self.differs is None or not self.differs.tensors_changed)
        )


def diagnose(model_dir: str | os.PathLike, served: Mapping[str, torch.Tensor] | None = None) -> Diagnosis:
    """Report a folder's pending journal, leftovers and (given served tensors) what differs.

    Read-only: unlike :func:`sync` it does not replay the journal, so it can be run first.
    """
    model_dir = Path(model_dir)
    entries = read_entries(model_dir)
    files: dict[str, int] = {}
    for e in entries.values():
        files[e.file] = files.get(e.file, 0) + 1
    pending = error = None
    if (model_dir / JOURNAL).exists():
        try:
            pending = {"blocks": 0, "bytes": 0, "files": [], "renames": []}
            for record in _records(model_dir / JOURNAL):
                if record[0] == "F":
                    continue
                if record[0] == "B":
                    pending["blocks"] += -(-len(record[3]) // BLOCK)
                    pending["bytes"] += len(record[3])
                    if record[1] not in pending["files"]:
                        pending["files"].append(record[1])
                else:
                    pending["renames"].append(record[2])
        except CheckpointError as e:
            pending, error = None, str(e)
    leftovers = sorted(p.name for p in [model_dir / JOURNAL_TMP, *model_dir.glob(f"*{SIDECAR_TMP_SUFFIX}")] if p.exists())
    differs = None
    if served is not None:
        differs = SyncReport()
        views = checkpoint_views(model_dir, served, entries)
        for _, _, name, _, blocks in _changes(model_dir, views, entries):
            differs.tensors_changed.append(name)
            differs.blocks += len(blocks)
    return Diagnosis(files, pending, error, leftovers, differs)


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
