"""Write back only the 4 KiB blocks that training changed (:func:`sync`), and :func:`diagnose`.

Why blocks and a journal: see docs/checkpoint.md, which holds the step-by-step and the
journal's byte format.
"""


from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amygdala.crash import crash_point
from amygdala.checkpoint.layout import LayoutError, placements, to_checkpoint
from amygdala.checkpoint.journal import _apply, _fsync_dir, _JournalWriter, _records, _recover
from amygdala.checkpoint.lock import writer_lock
from amygdala.checkpoint.safetensors import (
    _CHUNK, BLOCK, JOURNAL, JOURNAL_TMP, LOCK_WAIT_S, SIDECAR_TMP_SUFFIX, SIDECARS, CheckpointError, Entry,
    SyncReport,
    _check_folder, _tied, read_entries,
)


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
    sidecars = dict(sidecars or {})
    for name in sidecars:
        if name not in SIDECARS:  # replay renames only these into place (journal._check_records)
            raise CheckpointError(f"sidecar {name!r}: not one of the sidecars a sync writes ({', '.join(sorted(SIDECARS))})")
    entries = read_entries(model_dir)
    views = checkpoint_views(model_dir, served, entries)

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
                f.write(data[: len(data) // 2])
                f.flush()
                crash_point("sync.sidecar_half")
                f.write(data[len(data) // 2 :])
                f.flush()
                os.fsync(f.fileno())
            writer.rename(staged, name)
            report.sidecars.append(name)
        report.journal_bytes = writer.close()
        crash_point("sync.journal_written")
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
        crash_point("sync.committed")
        _apply(model_dir, model_dir / JOURNAL)
        crash_point("sync.applied")
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


