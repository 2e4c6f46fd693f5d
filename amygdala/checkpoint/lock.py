"""One writer per model folder: an ``flock`` on ``.amygdala-train.lock``.

Why: the CLI, the server's start-up and the training worker may all write a folder; see
docs/checkpoint.md.
"""


from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path


from amygdala.checkpoint.safetensors import LOCK_FILE, LOCK_WAIT_S, CheckpointError, _check_folder


# --------------------------------------------------------------------------- the writer lock
_HOLDER_BYTES = 96  # "PID holder", space-padded


def _open_lock(model_dir: Path) -> int:
    """The lock file's descriptor, refused unless it is a plain file of this folder.

    Why: a shared model folder may carry ``.amygdala-train.lock`` as a symlink (or a hard link)
    to a file elsewhere; the lock writes into its file, so it must never follow a link or write
    through another name. O_NOFOLLOW refuses a symlink; fstat checks what was opened."""
    path = model_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the writer lock ({e.strerror}; a symlink is refused): remove it "
                              "and retry") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise CheckpointError(f"{path}: the writer lock is not a plain file of this folder (a link or a special "
                              "file); remove it and retry")
    return fd
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
    fd = _open_lock(model_dir)
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
        # Overwritten in place, padded, never truncated: the file is ours (see _open_lock).
        os.pwrite(fd, f"{os.getpid()} {holder}".encode()[:_HOLDER_BYTES].ljust(_HOLDER_BYTES), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # releases the lock


