"""One writer per model folder: an ``flock`` on ``.amygdala-train.lock``.

Why: the CLI, the server's start-up and the training worker may all write a folder; see
docs/checkpoint.md.
"""


from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


from amygdala.checkpoint.safetensors import LOCK_FILE, LOCK_WAIT_S, CheckpointError, _check_folder


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


