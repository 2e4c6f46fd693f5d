"""The model folder as a checkpoint: block-level sync, its journal, the writer lock, the layout.

Why a component of its own: the CLI (``amygdala checkpoint``), the server's start-up and the
training worker all use it, and none of them needs the trainer. The step-by-step of a sync and
the journal's byte format are in docs/checkpoint.md. Imports nothing of ours but the root.
"""

from amygdala.checkpoint.journal import _apply, _JournalWriter, _records, recover
from amygdala.checkpoint.layout import LayoutError
from amygdala.checkpoint.lock import FolderBusy, writer_lock
from amygdala.checkpoint.safetensors import (
    BLOCK, DTYPES, JOURNAL, JOURNAL_TMP, LOCK_FILE, LOCK_WAIT_S, MAGIC, OLD_MAGIC, SIDECAR_TMP_SUFFIX,
    CheckpointError, Entry, SyncReport, file_stamp, load_tensors, read_entries, read_header, weight_files,
)
from amygdala.checkpoint.sync import Diagnosis, _Blocks, _changes, checkpoint_views, diagnose, sync

__all__ = [
    "BLOCK", "DTYPES", "JOURNAL", "JOURNAL_TMP", "LOCK_FILE", "LOCK_WAIT_S", "MAGIC", "OLD_MAGIC",
    "SIDECAR_TMP_SUFFIX", "CheckpointError", "Diagnosis", "Entry", "FolderBusy", "LayoutError",
    "SyncReport", "_Blocks", "_JournalWriter", "_apply", "_changes", "_records", "checkpoint_views",
    "diagnose", "file_stamp", "load_tensors", "read_entries", "read_header", "recover", "sync",
    "weight_files", "writer_lock",
]
