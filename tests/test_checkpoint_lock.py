"""One writer per model folder (checkpoint/lock.py), and a journal replayed only onto the files it
was written against (checkpoint/journal.py).

Formerly part of tests/test_hardening.py (issue 14).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import tiny
from amygdala.cli.main import main as cli
from amygdala import checkpoint
from amygdala.checkpoint import layout
from amygdala.checkpoint import JOURNAL, CheckpointError


HOLD = """
import sys, time
from amygdala import checkpoint
with checkpoint.writer_lock(sys.argv[1], holder="training worker"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_cli_sync_waits_for_another_writer_then_names_it(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    holder = _hold(folder, 60)
    try:
        assert cli(["checkpoint", "sync", "--model-dir", str(folder), "--wait", "0.3"]) != 0
        err = capsys.readouterr().err
        assert f"another training worker (pid {holder.pid}) holds this model folder" in err and "waited 0.3 s" in err
        with pytest.raises(checkpoint.FolderBusy):
            checkpoint.sync(folder, {}, wait=0.1)
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(folder, 1.0)  # released while the CLI waits: it then goes ahead
    assert cli(["checkpoint", "sync", "--model-dir", str(folder), "--wait", "60"]) == 0
    assert holder.wait(10) == 0 and "nothing pending" in capsys.readouterr().out


def test_recovery_refuses_a_journal_written_against_other_files(tmp_path):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    weights = folder / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}
    served = layout.to_served(tensors)
    served["model.norm.weight"] += 1
    entries = checkpoint.read_entries(folder)
    writer = checkpoint._JournalWriter(folder / JOURNAL)  # committed, never applied: a crash at the commit point
    blocks = checkpoint._Blocks(writer.block)
    for mm, e, name, new, changed in checkpoint._changes(folder, checkpoint.checkpoint_views(folder, served, entries), entries):
        blocks.add(mm, e, new, changed)
    blocks.flush()
    writer.close()
    save_file(tensors, weights, metadata={"format": "pt", "rewritten": "yes"})  # the same tensors, another file
    other = weights.read_bytes()
    with pytest.raises(CheckpointError, match=r"written against model\.safetensors of \d+ bytes, but that file differs"):
        checkpoint.recover(folder)
    assert weights.read_bytes() == other and (folder / JOURNAL).exists()  # nothing replayed, nothing lost
