"""A shared model folder's journal and lock file can touch nothing outside the folder (issue 24).

A journal someone else wrote (v1 or v2) replays only blocks into the folder's own weight files and
only ``X.amygdala-tmp -> X`` renames of known sidecars; the writer lock never follows a link nor
truncates what it opened.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from helpers import tiny
from amygdala import checkpoint
from amygdala.checkpoint import JOURNAL, LOCK_FILE, MAGIC, OLD_MAGIC, CheckpointError
from amygdala.cli.main import main as cli


def _name(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<H", len(raw)) + raw


def _journal(folder: Path, body: bytes, *, magic: bytes = MAGIC, stamps: bool = True) -> Path:
    """A committed journal (valid trailer) holding ``body``'s records after the weight files' stamps."""
    data = magic
    if stamps:
        for weights in checkpoint.weight_files(folder):
            size, digest = checkpoint.file_stamp(weights)
            data += b"F" + _name(weights.name) + struct.pack("<Q", size) + digest
    data += body
    path = folder / JOURNAL
    path.write_bytes(data + b"E" + struct.pack("<QI", len(data), zlib.crc32(data)))
    return path


def _block(file: str, offset: int, data: bytes) -> bytes:
    return b"B" + _name(file) + struct.pack("<QQ", offset, len(data)) + data


@pytest.fixture()
def folder(tmp_path) -> Path:
    path = tmp_path / "shared" / "model"
    tiny.make_model("llama", path)
    return path


@pytest.mark.parametrize("magic", [MAGIC, OLD_MAGIC])
@pytest.mark.parametrize("name", ["../../victim.txt", "../victim.txt", "/ABS", "sub/x.safetensors", ".amygdala-train.lock",
                                  "config.json"])
def test_a_journal_block_outside_the_weight_files_is_refused(folder, magic, name):
    victim = folder.parent.parent / "victim.txt"
    victim.write_text("precious")
    target = name.replace("/ABS", str(victim))
    _journal(folder, _block(target, 0, b"overwritten"), magic=magic, stamps=magic == MAGIC)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != JOURNAL}
    with pytest.raises(CheckpointError, match="not replayed|not a plain file"):
        checkpoint.recover(folder)
    assert victim.read_text() == "precious"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in (JOURNAL, LOCK_FILE)} \
        == {k: v for k, v in before.items() if k != LOCK_FILE}


@pytest.mark.parametrize("tmp,final", [("x", "/ABS"), ("x.amygdala-tmp", "../x"), ("config.json", "model.safetensors"),
                                       ("evil.amygdala-tmp", "evil"),
                                       ("amygdala-optimizer.pt.amygdala-tmp", "model.safetensors")])
def test_a_journal_rename_other_than_a_known_sidecar_is_refused(folder, tmp, final):
    outside = folder.parent / "created"
    (folder / tmp).write_text("staged") if "/" not in tmp else None
    final = final.replace("/ABS", str(outside))
    _journal(folder, b"R" + _name(tmp) + _name(final))
    weights = (folder / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="rename|not a plain file"):
        checkpoint.recover(folder)
    assert not outside.exists() and (folder / "model.safetensors").read_bytes() == weights


def test_a_v1_journal_is_held_to_the_same_rules_and_still_replays_in_place(folder):
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    _journal(folder, _block("model.safetensors", size - 4, b"\x00\x00\x00\x00"), magic=OLD_MAGIC, stamps=False)
    assert checkpoint.recover(folder) == 1 and weights.read_bytes()[-4:] == b"\x00" * 4
    _journal(folder, _block("model.safetensors", size - 2, b"\x00" * 4), magic=OLD_MAGIC, stamps=False)
    with pytest.raises(CheckpointError, match="past the file's"):  # a sync never grows a weight file
        checkpoint.recover(folder)
    assert weights.stat().st_size == size


def test_a_record_longer_than_the_journal_is_refused(folder):
    body = b"B" + _name("model.safetensors") + struct.pack("<QQ", 0, 1 << 40)
    _journal(folder, body)
    with pytest.raises(CheckpointError, match="past the journal's end|past the end"):
        checkpoint.recover(folder)


def test_the_cli_refuses_a_hostile_journal_in_one_line(folder, capsys):
    _journal(folder, _block("../../victim.txt", 0, b"x"))
    assert cli(["checkpoint", "sync", "--model-dir", str(folder)]) != 0
    err = capsys.readouterr().err.strip()
    assert "not a plain file of the model folder" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_an_index_pointing_outside_the_folder_is_refused(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../victim.safetensors"}}')
    with pytest.raises(CheckpointError, match="not a plain"):
        checkpoint.weight_files(folder)


def test_a_sync_writes_only_known_sidecars(folder):
    with pytest.raises(CheckpointError, match="not one of the sidecars"):
        checkpoint.sync(folder, {}, sidecars={"notes.txt": b"x"})


def test_the_lock_never_follows_a_symlink_nor_truncates_its_target(folder):
    victim = folder.parent.parent / "file"
    victim.write_text("precious content")
    (folder / LOCK_FILE).symlink_to(Path("..") / ".." / "file")
    with pytest.raises(CheckpointError, match="symlink is refused"):
        with checkpoint.writer_lock(folder):
            pass
    with pytest.raises(CheckpointError):
        checkpoint.recover(folder)
    assert victim.read_text() == "precious content"


def test_the_lock_refuses_a_hard_link_and_keeps_a_plain_file_untruncated(folder):
    other = folder.parent / "other"
    other.write_text("precious content")
    os.link(other, folder / LOCK_FILE)
    with pytest.raises(CheckpointError, match="not a plain file"):
        with checkpoint.writer_lock(folder):
            pass
    assert other.read_text() == "precious content"
    (folder / LOCK_FILE).unlink()
    (folder / LOCK_FILE).write_text("x" * 500)
    with checkpoint.writer_lock(folder, holder="test"):
        pass
    text = (folder / LOCK_FILE).read_text()
    assert len(text) == 500 and text.startswith(f"{os.getpid()} test")


def test_a_real_sync_with_the_optimizer_sidecar_still_replays(folder):
    served = {k: v.clone() for k, v in checkpoint.layout.to_served(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "model.safetensors")).items()}
    served["model.norm.weight"] += 1
    report = checkpoint.sync(folder, served, sidecars={"amygdala-optimizer.pt": b"state"})
    assert report.blocks >= 1 and (folder / "amygdala-optimizer.pt").read_bytes() == b"state"
    assert torch.equal(checkpoint.layout.to_served(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "model.safetensors"))["model.norm.weight"],
        served["model.norm.weight"])
