"""kill -9 of a live server (every process) at named crash points, on the CPU build of vLLM with
the tiny model, readout and training on.

The whole server (every process) dies at named crash points (amygdala.crash: mid-job, after
the sync's commit point, before it, midway through the block writes), by turns,
``AMYGDALA_KILL_TRIALS`` times (2: mid-job and after the commit, the window whose journal the
restart must replay; 4 for every point): the training worker SIGKILLs itself exactly there, the
rest of the server is killed after it, and the folder loads, every tensor is wholly old or
wholly new (and the optimizer state with them), and the restarted server serves and trains.
No sleep races a sync, so the outcome does not depend on the machine's speed. Every point,
20 kills each, without a server: tests/test_checkpoint_crash.py; this module proves the live
server's part (all its processes killed, the folder recovered, the restart serving and training).

Each trial restarts the server on the recovered folder (about 30 s on 2 cores); the module's
first server starts once like the others. One ``FIGURES {...}`` line (run with ``-s``).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import live as lv
from helpers.live import FROZEN, call, figures, idle, job, kill_tree, start, status, tree, wait_for
from amygdala import checkpoint
from amygdala.finetune.state import STATE_FILE

pytestmark = pytest.mark.vllm
KILL_TRIALS = int(os.environ.get("AMYGDALA_KILL_TRIALS", "2"))
#: Where each trial dies, by turns, and what it must leave after recovery (see amygdala.crash).
KILL_POINTS = (("train.step:2", "training", "old"), ("sync.committed", "sync", "new"),
               ("sync.journal_written", "sync", "old"), ("sync.block:2", "sync", "new"))


files, live = lv.fixtures("kill")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}


def _steps_on_disk(folder: Path) -> int | None:
    path = folder / STATE_FILE
    return torch.load(path, weights_only=True)["counters"]["steps"] if path.exists() else None


def _outcome(old: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """"old" when every tensor is as before, "new" when every trained one changed in every 4 KiB block, else raise."""
    kinds = set()
    for name, before in old.items():
        if any(f in name for f in FROZEN):
            assert torch.equal(got[name], before), f"{name} is frozen yet changed"
            continue
        if torch.equal(got[name], before):
            kinds.add("old")
            continue
        a, b = got[name].reshape(-1), before.reshape(-1)
        n = a.numel() // 1024 * 1024  # 4 KiB blocks of float32: a torn tensor keeps some of them old
        same = (a[:n].view(-1, 1024) == b[:n].view(-1, 1024)).all(1)
        assert not same.any(), f"{name}: {int(same.sum())} of {same.numel()} blocks old, the rest new: torn"
        kinds.add("new")
    assert len(kinds) == 1, f"mixed: {kinds}"
    return kinds.pop()


def _ask_until_killed(port: int, path: str, body=None) -> None:
    try:
        call(port, "POST", path, body, timeout=120)
    except (urllib.error.URLError, ConnectionError, OSError):
        pass  # the server was killed under it: that is the trial


def test_kill_9_at_crash_points_leaves_a_folder_that_loads_and_a_server_that_restarts(live, files):
    from transformers import AutoModelForCausalLM

    root, folder, readout = files
    model = str(folder)
    crash_file = root / "crash-at"
    hit = Path(f"{crash_file}.hit")
    outcomes: Counter[str] = Counter()
    restarts = []
    for trial in range(KILL_TRIALS):
        point, during, want = KILL_POINTS[trial % len(KILL_POINTS)]
        server = live["server"]
        port = server.port
        idle(port, 600)
        code, sync = call(port, "POST", "/checkpoint", timeout=600)
        assert code == 200, sync
        old, old_steps = _tensors(folder), _steps_on_disk(folder)
        hit.unlink(missing_ok=True)
        if during == "training":
            crash_file.write_text(point)  # armed only now: the syncs above ran unarmed
            code, j = call(port, "POST", "/train", job(samples=4, steps=2000, lr=1e-4, seed=trial))
            assert code == 200, j
            new_steps = None  # the job dies before any sync: "new" would be a failure
        else:
            code, j = call(port, "POST", "/train", job(samples=2, steps=3, lr=1e-3, seed=trial))
            assert code == 200, j
            done = wait_for(lambda: (s := status(port))["finished"] and s["finished"][0]["id"] == j["job_id"] and s, 120, "the job")
            new_steps = done["steps"]
            crash_file.write_text(point)
            threading.Thread(target=_ask_until_killed, args=(port, "/checkpoint"), daemon=True).start()
        procs = tree(server.proc)
        wait_for(hit.exists, 300, f"the training worker to die at {point}")
        pid = int(hit.read_text().split()[0])
        assert pid in {p.pid for p in procs}, (pid, [p.pid for p in procs])  # a process of this server died there
        killed = kill_tree(server.proc)  # the rest of the server, after the point's window
        pending = (folder / checkpoint.JOURNAL).exists()
        uncommitted = (folder / checkpoint.JOURNAL_TMP).exists()
        load_file(folder / "model.safetensors")  # parses before recovery: headers are never written
        checkpoint.recover(folder)  # what the next server's start does first
        got = _tensors(folder)
        AutoModelForCausalLM.from_pretrained(folder)
        kind = _outcome(old, got)
        assert kind == want, (point, kind)
        steps = _steps_on_disk(folder)
        assert steps == (old_steps if kind == "old" else new_steps), (kind, steps, old_steps)  # the state went with the weights
        outcomes[f"{point}: {kind}{' after replay' if pending else ' (uncommitted journal removed)' if uncommitted else ''}"] += 1
        t0 = time.monotonic()
        live["server"] = again = start(folder, readout, root / f"restart-{trial}.log", crash_file)
        restarts.append(round(time.monotonic() - t0, 1))
        code, r = call(again.port, "POST", "/v1/completions", {"model": model, "prompt": [2, 20, 21], "max_tokens": 4, "temperature": 0})
        assert code == 200 and r["choices"][0]["text"], r
        assert status(again.port)["steps"] == steps  # the count continues from the folder
        code, j = call(again.port, "POST", "/train", job(samples=1, steps=2, lr=1e-6, seed=99))
        assert code == 200
        s = wait_for(lambda: (s := status(again.port))["finished"] and s, 120, "a job after the restart")
        assert s["finished"][0]["state"] == "done" and s["steps"] == steps + 2
        assert killed >= 2, killed  # API server and engine core at least were still alive
    figures("kill -9", trials=KILL_TRIALS, outcomes=dict(outcomes), restart_s=restarts)
    for point, _, want in KILL_POINTS[:KILL_TRIALS]:  # each point's window, by the journal left before recovery
        assert any(k.startswith(f"{point}: {want}") for k in outcomes), outcomes
