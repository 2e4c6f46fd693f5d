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
    _CHUNK, BLOCK, JOURNAL, JOURNAL_TMP, LOCK_WAIT_S, MAGIC, OLD_MAGIC, SIDECAR_TMP_SUFFIX, SIDECARS,
    CheckpointError,
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
    (n,) = struct.unpack("<H", _exact(f, 2))
    return _exact(f, n).decode()


def _exact(f, n: int) -> bytes:
    """``n`` bytes or a refusal: a record may not claim more bytes than the journal holds."""
    data = f.read(n)
    if len(data) != n:
        raise CheckpointError(f"{f.name}: a journal record runs past the end of the file; move the journal away")
    return data


def _plain(journal: Path, name: str) -> str:
    """A record's file name, refused unless it is a plain name in the folder (no path, no dot file).

    Why: a shared model folder may carry a journal someone else wrote; replay must never reach a
    file outside the folder (``../x``, ``/abs``) nor one of ours (the lock, the journal itself)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise CheckpointError(f"{journal}: record names {name!r}, not a plain file of the model folder; "
                              "the journal was not replayed (move it away to load the folder)")
    return name


def _records(path: Path, data: bool = True) -> Iterator[tuple]:
    """The journal's records, after checking its trailer:
    ("F", file, size, header hash) | ("B", file, offset, data) | ("R", tmp, final).
    ``data=False``: a block record carries its length instead of its bytes (a checking pass)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < len(MAGIC) + 13 or f.read(len(MAGIC)) not in (MAGIC, OLD_MAGIC):
            raise CheckpointError(f"{path}: not an amygdala sync journal (bad magic); move it away to load the folder")
        f.seek(size - 13)
        tag, (body, crc) = f.read(1), struct.unpack("<QI", _exact(f, 12))
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
        try:
            while f.tell() < body:
                kind = f.read(1)
                if kind == b"B":
                    file = _read_name(f)
                    offset, n = struct.unpack("<QQ", _exact(f, 16))
                    if n > body - f.tell():
                        raise CheckpointError(f"{path}: a block record claims {n} bytes past the journal's end")
                    if data:
                        yield "B", file, offset, _exact(f, n)
                    else:
                        f.seek(n, os.SEEK_CUR)
                        yield "B", file, offset, n
                elif kind == b"R":
                    yield "R", _read_name(f), _read_name(f)
                elif kind == b"F":
                    file = _read_name(f)
                    (file_size,) = struct.unpack("<Q", _exact(f, 8))
                    yield "F", file, file_size, _exact(f, 32)
                else:
                    raise CheckpointError(f"{path}: unknown journal record {kind!r} at byte {f.tell() - 1}")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: a journal record's file name is not UTF-8; move the journal away") from None


def _apply(model_dir: Path, journal: Path) -> tuple[int, int]:
    """Write every record of a committed journal into the folder; (blocks, bytes).

    Every record is checked before the first byte is written (:func:`_check_records`)."""
    _check_records(model_dir, journal)
    fds: dict[str, int] = {}
    blocks = written = 0
    renames = []
    try:
        for record in _records(journal):
            if record[0] == "B":
                _, file, offset, data = record
                if file not in fds:
                    fds[file] = os.open(model_dir / file, os.O_WRONLY)
                view = memoryview(data)
                while view:  # one pwrite may write less (Linux caps a write near 2 GiB)
                    n = os.pwrite(fds[file], view, offset)
                    view, offset = view[n:], offset + n
                blocks += -(-len(data) // BLOCK)
                written += len(data)
                crash_point("sync.block")
            elif record[0] == "R":
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


def _check_records(model_dir: Path, journal: Path) -> None:
    """Refuse a journal unless replaying it can only touch what a sync of this folder writes.

    ``B`` blocks: a weight file of the folder (``F``-stamped first in a v2 journal), inside its
    current size (a sync never grows a file). ``R`` renames: only ``X.amygdala-tmp -> X`` for a
    sidecar sync writes (:data:`SIDECARS`). A v1 journal (no stamps) is held to the same names.
    """
    with open(journal, "rb") as f:
        stamped = None if f.read(len(MAGIC)) == OLD_MAGIC else set()  # files whose stamp matched
    weights = {p.name for p in weight_files(model_dir)}
    sizes: dict[str, int] = {}
    for record in _records(journal, data=False):
        if record[0] == "F":
            file = _plain(journal, record[1])
            if stamped is None or file not in weights:
                raise CheckpointError(f"{journal}: a file record for {file!r}, not a weight file of the folder; "
                                      "the journal was not replayed (move it away to load the folder)")
            _check_stamp(model_dir, journal, *record[1:])
            stamped.add(file)
        elif record[0] == "B":
            _, file, offset, n = record
            _plain(journal, file)
            if file not in weights or (stamped is not None and file not in stamped):
                raise CheckpointError(f"{journal}: blocks for {file!r}, not a (stamped) weight file of the folder; "
                                      "the journal was not replayed (move it away to load the folder)")
            if file not in sizes:
                sizes[file] = (model_dir / file).stat().st_size
            if offset + n > sizes[file]:
                raise CheckpointError(f"{journal}: a block for {file} ends at byte {offset + n}, past the file's "
                                      f"{sizes[file]} bytes; the journal was not replayed (move it away)")
        else:
            _, tmp, final = record
            if _plain(journal, final) not in SIDECARS or tmp != final + SIDECAR_TMP_SUFFIX:
                raise CheckpointError(f"{journal}: a rename {tmp!r} -> {final!r}; only X{SIDECAR_TMP_SUFFIX} -> X of "
                                      f"a known sidecar ({', '.join(sorted(SIDECARS))}) is replayed (move it away)")


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
