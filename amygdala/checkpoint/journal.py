"""The sync journal: written before any block lands in a file, replayed by :func:`recover`.

Why: a kill -9 mid-write must leave every tensor wholly old or wholly new. The byte format is
specified in docs/checkpoint.md (a spec, so it lives with the other docs, not in code).
"""


from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path


from amygdala.crash import crash_point
from amygdala.checkpoint.lock import writer_lock
from amygdala.checkpoint.safetensors import (
    _CHUNK, BLOCK, JOURNAL, JOURNAL_TMP, LOCK_WAIT_S, MAGIC, OLD_MAGIC, SIDECAR_TMP_SUFFIX, CheckpointError,
    _check_folder, file_stamp, weight_files,
)


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
                crash_point("sync.block")
            else:
                renames.append(record[1:])
        for fd in fds.values():
            os.fsync(fd)
        crash_point("sync.blocks_done")
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
