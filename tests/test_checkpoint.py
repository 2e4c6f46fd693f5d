"""Checkpoint sync: only changed 4 KiB blocks are written, served names map back to the folder's,
and a kill -9 at any moment leaves a folder whose every tensor is wholly old or wholly new."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny
from amygdala.cli.main import main as cli
from amygdala import checkpoint
from amygdala.checkpoint import layout
from amygdala.checkpoint import BLOCK, JOURNAL, CheckpointError

TESTS = Path(__file__).resolve().parent


def _load(folder: Path) -> dict[str, torch.Tensor]:
    """Copies (safetensors' load_file maps the file, and sync rewrites it in place)."""
    out = {}
    for f in checkpoint.weight_files(folder):
        out.update({k: v.clone() for k, v in load_file(f).items()})
    return out


@pytest.fixture()
def folder(tmp_path) -> Path:
    path = tmp_path / "model"
    tiny.make_model("llama", path)
    return path


def _served(folder: Path) -> dict[str, torch.Tensor]:
    return layout.to_served(_load(folder))


def test_one_changed_value_writes_one_block(folder):
    served = _served(folder)
    before = (folder / "model.safetensors").read_bytes()
    entry = checkpoint.read_entries(folder)["model.layers.1.mlp.down_proj.weight"]
    served["model.layers.1.mlp.down_proj.weight"][10, 20] += 0.5
    assert checkpoint.diagnose(folder, served).differs.tensors_changed == ["model.layers.1.mlp.down_proj.weight"]

    report = checkpoint.sync(folder, served)
    assert report.tensors_changed == ["model.layers.1.mlp.down_proj.weight"]
    assert (report.blocks, report.bytes_written) == (1, BLOCK)
    after = (folder / "model.safetensors").read_bytes()
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    offset = entry.start + (10 * 128 + 20) * 4
    assert changed and min(changed) >= offset and max(changed) < offset + 4
    assert _load(folder)["model.layers.1.mlp.down_proj.weight"][10, 20] == served["model.layers.1.mlp.down_proj.weight"][10, 20]
    assert checkpoint.diagnose(folder, served).clean
    assert checkpoint.sync(folder, served).blocks == 0  # nothing left to write
    assert not (folder / JOURNAL).exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_served_tensors_land_in_their_parts(tmp_path, arch):
    path = tmp_path / arch
    model, _ = tiny.make_model(arch, path)
    served = _served(path)
    q = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    inter = model.config.intermediate_size
    with torch.no_grad():
        served["model.layers.0.self_attn.qkv_proj.weight"][:q] += 1  # q only
        served["model.layers.2.mlp.gate_up_proj.weight"][inter:] += 1  # up only
        if arch == "qwen2":
            served["model.layers.3.self_attn.qkv_proj.bias"][-1] += 1  # last of v's bias
    report = checkpoint.sync(path, served)
    expected = {"model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"}
    if arch == "qwen2":
        expected.add("model.layers.3.self_attn.v_proj.bias")
    assert set(report.tensors_changed) == expected
    loaded, original = _load(path), model.state_dict()
    for name in original:
        assert torch.equal(loaded[name], original[name] + (1 if name in expected else 0) * (
            torch.nn.functional.one_hot(torch.tensor(original[name].shape[0] - 1), original[name].shape[0]).float()
            if name.endswith("bias") else 1)), name


def test_a_block_shared_by_two_tensors_keeps_both_changes(folder):
    entries = sorted(checkpoint.read_entries(folder).items(), key=lambda kv: kv[1].start)
    a, b = next((x, y) for x, y in zip(entries, entries[1:]) if x[1].end % BLOCK and y[1].start == x[1].end
                and x[1].end // BLOCK == y[1].start // BLOCK and len(x[1].shape) == 2 and len(y[1].shape) == 2)
    served = _load(folder)  # checkpoint names work as served names too
    served[a[0]].view(-1)[-1] += 1.0
    served[b[0]].view(-1)[0] += 1.0
    report = checkpoint.sync(folder, served)
    assert report.blocks == 1 and set(report.tensors_changed) == {a[0], b[0]}
    loaded = _load(folder)
    assert torch.equal(loaded[a[0]], served[a[0]]) and torch.equal(loaded[b[0]], served[b[0]])


def test_bf16_served_keeps_full_precision_where_unchanged(folder):
    original = _load(folder)
    served = {k: v.to(torch.bfloat16) for k, v in layout.to_served(original).items()}
    assert checkpoint.sync(folder, served).blocks == 0
    name = "model.layers.0.self_attn.o_proj.weight"
    served[name][0, 0] += 1
    checkpoint.sync(folder, served)
    loaded = _load(folder)
    assert loaded[name][0, 0] == served[name][0, 0].float()
    assert torch.equal(loaded[name].view(-1)[1:], original[name].view(-1)[1:])  # fp32 bits, not bf16-rounded


def test_sharded_folder_and_sidecar(tmp_path):
    path = tmp_path / "sharded"
    model, _ = tiny.make_model("llama")
    model.save_pretrained(path, max_shard_size="150KB")
    assert len(checkpoint.weight_files(path)) > 2
    served = _served(path)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        served[name] += 0.25
    report = checkpoint.sync(path, served, sidecars={"amygdala-optimizer.pt": b"\x00" * 10})
    assert len(report.tensors_changed) == 3 and report.sidecars == ["amygdala-optimizer.pt"]
    assert (path / "amygdala-optimizer.pt").read_bytes() == b"\x00" * 10
    loaded = _load(path)
    assert all(torch.equal(loaded[n], t) for n, t in layout.to_checkpoint(served, {n: tuple(v.shape) for n, v in loaded.items()}).items())


def test_tied_folder_accepts_a_served_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    _, tok = tiny.make_model("llama")
    config = tiny.make_config("llama", len(tok))
    config.tie_word_embeddings = True
    path = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    served = _served(path)
    assert "lm_head.weight" not in served
    served["lm_head.weight"] = served["model.embed_tokens.weight"]  # vLLM may list the shared head
    served["model.embed_tokens.weight"][5] += 1
    assert checkpoint.sync(path, served).tensors_changed == ["model.embed_tokens.weight"]


def test_mismatched_served_tensors_are_named(folder):
    served = _served(folder)
    served["model.layers.9.mlp.down_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"served tensor\(s\) model.layers.9.mlp.down_proj.weight have no counterpart"):
        checkpoint.sync(folder, served)
    served = _served(folder)
    del served["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"model.norm.weight: no served tensor model.norm.weight"):
        checkpoint.sync(folder, served)
    with pytest.raises(CheckpointError, match="not a folder"):
        checkpoint.sync(folder / "nope", served)
    (folder / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"broken.safetensors: header length .* exceeds the file"):
        checkpoint.sync(folder, served)


def _pending_journal(folder: Path, served) -> None:
    """A committed journal that was never applied: the state right after a crash at the commit point."""
    entries = checkpoint.read_entries(folder)
    views = checkpoint.checkpoint_views(folder, served, entries)
    writer = checkpoint._JournalWriter(folder / JOURNAL)
    blocks = checkpoint._Blocks(writer.block)
    for mm, e, name, new, changed in checkpoint._changes(folder, views, entries):
        blocks.add(mm, e, new, changed)
    blocks.flush()
    writer.close()


def test_pending_journal_is_diagnosed_and_replayed_from_the_cli(folder, capsys):
    served = _served(folder)
    served["model.norm.weight"] += 1
    _pending_journal(folder, served)
    assert cli(["checkpoint", "diagnose", "--model-dir", str(folder)]) == 1
    assert re.search(r"pending journal \.amygdala-sync\.journal: 1 block\(s\), \d+ bytes for model\.safetensors",
                     capsys.readouterr().out)
    assert not torch.equal(_load(folder)["model.norm.weight"], served["model.norm.weight"])
    assert cli(["checkpoint", "sync", "--model-dir", str(folder)]) == 0
    assert "replayed an interrupted sync: 1 block(s)" in capsys.readouterr().out
    assert torch.equal(_load(folder)["model.norm.weight"], served["model.norm.weight"])
    assert cli(["checkpoint", "diagnose", "--model-dir", str(folder)]) == 0
    assert capsys.readouterr().out.strip().endswith("clean")


def test_corrupt_journal_is_refused(folder):
    served = _served(folder)
    served["model.norm.weight"] += 1
    _pending_journal(folder, served)
    raw = bytearray((folder / JOURNAL).read_bytes())
    raw[100] ^= 0xFF
    (folder / JOURNAL).write_bytes(bytes(raw))
    assert "checksum mismatch" in checkpoint.diagnose(folder).journal_error
    with pytest.raises(CheckpointError, match="journal checksum mismatch"):
        checkpoint.recover(folder)


def test_cli_sync_from_a_file_of_served_tensors(folder, tmp_path, capsys):
    served = _served(folder)
    served["model.layers.2.self_attn.qkv_proj.weight"][-1] += 1  # the last row of v
    save_file(served, tmp_path / "served.safetensors")
    assert cli(["checkpoint", "diagnose", "--model-dir", str(folder), "--against", str(tmp_path / "served.safetensors")]) == 1
    assert "1 tensor(s) differ (1 block(s)): model.layers.2.self_attn.v_proj.weight" in capsys.readouterr().out
    assert cli(["checkpoint", "sync", "--model-dir", str(folder), "--from", str(tmp_path / "served.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("1 tensor(s) changed: 1 block(s), 4096 bytes written")
    assert cli(["checkpoint", "sync", "--model-dir", str(tmp_path / "missing")]) == 2


# --------------------------------------------------------------------------- kill -9
STATE = "amygdala-optimizer.pt"


def kill_driver(folder: str, trials: int, seed: int) -> None:
    """Run in a fresh interpreter: fork a sync per trial, SIGKILL it at a random moment, recover, check.

    Prints one JSON line: the outcome counts. Raises (exit 1) on any torn tensor or state.
    Where the kills land depends on the machine's speed, so only "never torn" is asserted; each
    window is reached for certain by the crash points (tests/test_checkpoint_crash.py).
    """
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    folder = Path(folder)
    weights = folder / "model.safetensors"
    pristine = weights.read_bytes()
    old = _load(folder)
    rng = random.Random(seed)
    new = {}
    for i, (name, t) in enumerate(sorted(old.items())):
        if i % 3 == 0:  # a third unchanged, a third changed everywhere, a third in one element
            new[name] = t.clone()
        elif i % 3 == 1:
            new[name] = t + 0.01
        else:
            new[name] = t.clone()
            new[name].view(-1)[rng.randrange(t.numel())] += 1
    changed = [n for n in old if not torch.equal(old[n], new[n])]
    served = layout.to_served(new)
    old_state, new_state = b"old" * 1000, b"new" * 3000

    def restore() -> None:
        with open(weights, "r+b") as f:
            f.write(pristine)
        (folder / STATE).write_bytes(old_state)
        for p in folder.glob(".amygdala-sync*"):
            p.unlink()

    def fork_sync() -> int:
        pid = os.fork()
        if pid == 0:
            try:
                checkpoint.sync(folder, served, sidecars={STATE: new_state})
            finally:
                os._exit(0)
        return pid

    restore()
    t0 = time.perf_counter()
    os.waitpid(fork_sync(), 0)
    full = time.perf_counter() - t0
    outcomes: Counter[str] = Counter()
    for trial in range(trials):
        restore()
        pid = fork_sync()
        time.sleep(rng.uniform(0, 1.2 * full))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pending = (folder / JOURNAL).exists()
        load_file(weights)  # the header is never touched: the file parses even before recovery
        checkpoint.recover(folder)
        got = _load(folder)
        kinds = set()
        for name in changed:
            if torch.equal(got[name], old[name]):
                kinds.add("old")
            elif torch.equal(got[name], new[name]):
                kinds.add("new")
            else:
                raise AssertionError(f"trial {trial}: {name} is torn")
        state = (folder / STATE).read_bytes()
        kinds.add({old_state: "old", new_state: "new"}.get(state, "torn state"))
        if len(kinds) != 1:
            raise AssertionError(f"trial {trial}: mixed outcome {sorted(kinds)}")
        if trial % 25 == 0:
            AutoModelForCausalLM.from_pretrained(folder)
        outcomes[kinds.pop() + (" after replay" if pending else "")] += 1
    print(json.dumps({"outcomes": outcomes, "sync_seconds": full}))


def test_kill_9_at_random_moments_leaves_every_tensor_old_or_new(folder):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_checkpoint import kill_driver; kill_driver({str(folder)!r}, 80, 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 80  # and none torn: the driver raises on the first
    assert set(outcomes) <= {"old", "new", "new after replay"}, outcomes


def test_changed_rows_write_exactly_their_blocks(folder):
    served = _load(folder)
    name = "model.embed_tokens.weight"
    entry = checkpoint.read_entries(folder)[name]
    row = entry.shape[1] * 4
    served[name][20:61] += 1.0
    first, last = (entry.start + 20 * row) // BLOCK, (entry.start + 61 * row - 1) // BLOCK
    report = checkpoint.sync(folder, served)
    assert report.blocks == last - first + 1 and report.bytes_written == report.blocks * BLOCK
    assert torch.equal(_load(folder)[name], served[name])


@pytest.mark.parametrize("seed", range(6))
def test_random_changes_give_the_same_file_as_writing_it_whole(tmp_path, seed):
    """Many small tensors of odd sizes share blocks; any subset of changes must land exactly."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    old = {}
    for i in range(40):
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        old[f"t{i:02d}"] = torch.randn(rng.choice([1, 3, 7, 50, 333, 1025, 2500]), generator=gen).to(dtype)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(old, folder / "model.safetensors")
    new = {k: v.clone() for k, v in old.items()}
    for name in rng.sample(sorted(new), 15):
        t = new[name]
        for _ in range(rng.choice([1, 2, t.numel()])):
            t[rng.randrange(t.numel())] += 1
    checkpoint.sync(folder, new)
    save_file(new, tmp_path / "whole.safetensors")
    assert (folder / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
