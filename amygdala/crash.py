"""Named crash points: ``AMYGDALA_CRASH_AT=NAME[:N]`` makes the process SIGKILL itself there.

Why: a kill -9 test that sleeps and then kills races the process, and on a fast (or slow)
machine the kill lands outside the window it means to test (issue 25: a sync finished before
the kill arrived). A crash point is a window reached deterministically, the way SQLite's crash
tests and ``failpoints`` libraries do it: the code calls :func:`crash_point` at the moment that
matters, and a test (or ``./dev bench crash``) names that moment in the environment of the
process it wants dead. ``N`` (default 1) kills at the N-th time the point is reached in this
process, e.g. ``train.step:3`` after the third optimizer step.

A running server cannot have its environment changed, so ``AMYGDALA_CRASH_FILE=PATH`` arms
points at run time instead: each point reached reads ``NAME[:N]`` from PATH if it exists (N
counts the hits since that text was written). Before dying the process renames PATH to
``PATH.hit`` holding its pid, so a test knows which process died at which point and when.

Unset (every real run) a crash point costs two dictionary lookups. The points, where they are
and what each leaves behind are listed in :data:`POINTS` (and docs/finetuning.md).
"""

from __future__ import annotations

import os
import signal

#: The variable that names the point (``NAME`` or ``NAME:N``).
ENV = "AMYGDALA_CRASH_AT"
#: The variable that names a file holding the point, read at every hit (a live server's switch).
FILE_ENV = "AMYGDALA_CRASH_FILE"

#: Every crash point in the code, with the window it opens.
POINTS = {
    "sync.journal_written": "the temporary journal is complete and fsynced, not yet renamed: the commit point not reached",
    "sync.sidecar_half": "half of a sidecar (the optimizer state) is staged: before the commit point",
    "sync.committed": "the journal was renamed into place (the commit point), no block written yet",
    "sync.block": "after one run of blocks is written into a weight file (N: which run): midway through the writes",
    "sync.blocks_done": "every block is written and fsynced, the sidecar renames (optimizer state) not done",
    "sync.applied": "everything is applied, the committed journal not yet removed",
    "train.step": "the training worker finished an optimizer step of a job (N: which step): mid-job",
    "read.batch_written": "read --file appended one batch of rows to its table (N: which batch): mid-file",
}

_hits: dict[str, int] = {}
_file_text = [""]  # the crash file's text when last read, to restart the counts when it changes


def parse(value: str, source: str = ENV) -> tuple[str, int]:
    """``NAME[:N]`` as (point, N); an unknown point or a bad N is refused naming ``source``."""
    name, _, n = value.strip().partition(":")
    if name not in POINTS:
        raise ValueError(f"{source}={value!r}: unknown crash point {name!r}; the points are {', '.join(POINTS)}")
    try:
        count = int(n) if n else 1
    except ValueError:
        raise ValueError(f"{source}={value!r}: N must be a whole number (NAME:N)") from None
    if count < 1:
        raise ValueError(f"{source}={value!r}: N must be 1 or more")
    return name, count


def armed() -> tuple[str, int] | None:
    """The (point, N) the environment or its crash file names, or None."""
    if value := os.environ.get(ENV):
        return parse(value)
    path = os.environ.get(FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            value = f.read()
    except FileNotFoundError:
        return None
    if value != _file_text[0]:  # newly armed: the hits count from here
        _file_text[0] = value
        _hits.clear()
    return parse(value, f"{FILE_ENV} {path}") if value.strip() else None


def crash_point(name: str) -> None:
    """SIGKILL this process if ``AMYGDALA_CRASH_AT`` (or the crash file) names ``name`` and this
    is its N-th hit.

    SIGKILL, not an exception or ``os._exit``: no ``finally``, no buffered write, no atexit
    handler runs, exactly as under ``kill -9`` or a power cut of the process.
    """
    if name not in POINTS:  # a typo in the code would make a test wait for a window that never opens
        raise ValueError(f"crash_point({name!r}): not in amygdala.crash.POINTS")
    target = armed()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= target[1]:
        path = None if os.environ.get(ENV) else os.environ.get(FILE_ENV)
        if path:
            # PATH.hit names the process that died here (written whole, then renamed, so a reader
            # never sees it empty); PATH goes so that a restarted process is not armed again
            with open(path + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {name}:{target[1]}\n")
            os.replace(path + ".tmp", path + ".hit")
            os.unlink(path)
        os.kill(os.getpid(), signal.SIGKILL)
