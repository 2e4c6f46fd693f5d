"""Kill -9 at a named crash point (amygdala.crash), then recover and check: shared by the tests and
``./dev bench crash``.

Why a driver run in a fresh interpreter: each trial forks the process and the child SIGKILLs
itself at the point, so the window is reached every time, on a fast machine or a slow one (no
sleep racing the process). Forking is safe because the driver sets torch to one thread before
any tensor operation (a fork of a process with a live OpenMP pool can hang the child).

    python -m tests.helpers.crash POINT[,POINT...]|all TRIALS FOLDER   ->  one JSON line per point

Every trial: the folder is put back to its old state (3 steps trained and synced), the child
syncs (or trains) the new state (6 steps) and dies at the point, the parent checks the child
died of SIGKILL, looks at the folder before recovery, recovers, and checks every tensor and the
optimizer state's step count are wholly old or wholly new, together. Raises on any torn tensor,
mixed outcome, or a point the child never reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

#: What a kill at each point must leave after recovery, and what the folder shows before it.
EXPECT = {
    "sync.journal_written": ("old", "uncommitted journal removed"),
    "sync.sidecar_half": ("old", "uncommitted journal removed"),
    "sync.committed": ("new", "after replay"),
    "sync.block": ("new", "after replay"),
    "sync.blocks_done": ("new", "after replay"),
    "sync.applied": ("new", "after replay"),
    "train.step": ("old", "nothing pending"),
}
SYNC_TEMPORARIES = (".amygdala-sync*", "*.amygdala-tmp*")


class Scenario:
    """A tiny model folder synced at 3 steps (old) and a trainer holding 6 steps in memory (new)."""

    def __init__(self, folder: Path):
        import torch

        from amygdala import checkpoint
        from amygdala.finetune.state import STATE_FILE

        from .training import tiny_trainer

        torch.set_num_threads(1)
        self.folder, self.state_file = Path(folder), Path(folder) / STATE_FILE
        self.trainer, _ = tiny_trainer(self.folder)
        self._job(3)
        self.trainer.sync()
        self.weights = checkpoint.weight_files(self.folder)
        self.pristine = {p: p.read_bytes() for p in self.weights}
        self.old_state = self.state_file.read_bytes()
        self.old = self.tensors()
        self._job(3)
        status = self._fork(None, self.trainer.sync)
        assert status == 0, f"the reference sync exited with {status}"
        self.new = self.tensors()
        self.changed = [n for n in self.old if not torch.equal(self.old[n], self.new[n])]
        assert self.changed, "training changed no tensor: nothing to tear"
        # sync.block's N: midway through the journal's runs of blocks
        self.restore()
        assert self._fork("sync.journal_written", self.trainer.sync) == -signal.SIGKILL
        runs = sum(1 for r in checkpoint._records(self.folder / checkpoint.JOURNAL_TMP) if r[0] == "B")
        assert runs >= 2, f"the sync writes {runs} run(s) of blocks: no middle to die in"
        self.block_n = runs // 2
        self.runs = runs

    def _job(self, steps: int) -> None:
        from amygdala.finetune.inputs import JobConfig, Sample

        sample = Sample(context_ids=[2, 10, 11, 12], continuation_ids=[40, 41, 42])
        self.trainer.run([sample], JobConfig(learning_rate=1e-2, steps=steps))

    def tensors(self) -> dict:
        out = {}
        for p in self.weights:
            out.update(_load(p))
        return out

    def steps_on_disk(self) -> int:
        import io

        import torch

        return torch.load(io.BytesIO(self.state_file.read_bytes()), weights_only=True)["counters"]["steps"]

    def restore(self) -> None:
        for p, data in self.pristine.items():
            with open(p, "r+b") as f:
                f.write(data)
        self.state_file.write_bytes(self.old_state)
        for pattern in SYNC_TEMPORARIES:
            for p in self.folder.glob(pattern):
                p.unlink()

    def _fork(self, point: str | None, work) -> int:
        """Run ``work`` in a child armed at ``point``; its wait status (negative: the signal)."""
        from amygdala.crash import ENV

        pid = os.fork()
        if pid == 0:
            try:
                if point:
                    os.environ[ENV] = point
                work()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def _train_until_killed(self) -> None:
        """The service's job thread, as in the training worker; the crash point ends it mid-job."""
        from amygdala.finetune.service import TrainingService

        svc = TrainingService(self.trainer, sync_delay=0.0, reset_cache=None)
        stop = threading.Event()
        threading.Thread(target=svc.run, args=(stop,), daemon=True).start()
        svc.submit({"samples": [{"context_ids": [2, 10, 11, 12], "continuation_ids": [40, 41, 42]}],
                    "config": {"objective": "sft", "learning_rate": 1e-2, "steps": 5}})
        time.sleep(120)  # never reached in a passing trial: the crash point kills the process first

    def trial(self, point: str) -> str:
        """One kill at ``point``; the outcome, e.g. "new after replay"; raises on a torn folder."""
        from amygdala import checkpoint

        self.restore()
        spec = f"{point}:{self.block_n}" if point == "sync.block" else f"{point}:2" if point == "train.step" else point
        work = self._train_until_killed if point == "train.step" else self.trainer.sync
        status = self._fork(spec, work)
        if status != -signal.SIGKILL:
            raise AssertionError(f"{spec}: the child exited with {status}, not SIGKILL: the point was never reached")
        pending = (self.folder / checkpoint.JOURNAL).exists()
        uncommitted = (self.folder / checkpoint.JOURNAL_TMP).exists() or any(self.folder.glob("*.amygdala-tmp*"))
        before = self.tensors()  # every file parses before recovery: headers are never written
        _check_window(spec, before, self.old, self.new, self.changed, self.steps_on_disk())
        checkpoint.recover(self.folder)
        got = self.tensors()
        kinds = set()
        for name in self.changed:
            if torch_equal(got[name], self.old[name]):
                kinds.add("old")
            elif torch_equal(got[name], self.new[name]):
                kinds.add("new")
            else:
                raise AssertionError(f"{spec}: {name} is torn after recovery")
        steps = self.steps_on_disk()
        kinds.add({3: "old", 6: "new"}.get(steps, f"optimizer state at {steps} steps"))
        if len(kinds) != 1:
            raise AssertionError(f"{spec}: mixed outcome {sorted(kinds)}")
        where = "after replay" if pending else "uncommitted journal removed" if uncommitted else "nothing pending"
        return f"{kinds.pop()} {where}".strip()


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _check_window(spec: str, before, old, new, changed, steps: int) -> None:
    """The folder before recovery is what the point's window should leave: proof it was that window."""
    point = spec.partition(":")[0]
    all_old = all(torch_equal(before[n], old[n]) for n in changed)
    all_new = all(torch_equal(before[n], new[n]) for n in changed)
    want = {
        "sync.journal_written": all_old and steps == 3, "sync.sidecar_half": all_old and steps == 3,
        "sync.committed": all_old and steps == 3, "train.step": all_old and steps == 3,
        "sync.block": not all_old and not all_new and steps == 3,  # midway: some blocks written, not all
        "sync.blocks_done": all_new and steps == 3, "sync.applied": all_new and steps == 6,
    }[point]
    if not want:
        raise AssertionError(f"{spec}: before recovery the weights were all old: {all_old}, all new: {all_new}, "
                             f"the state at {steps} steps: not the window this point names")


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(path).items()}


def run(points: list[str], trials: int, folder: Path) -> list[dict]:
    """``trials`` kills at each of ``points`` on one scenario: per point {"point", "trials",
    "outcomes", "losses": 0, "seconds_per_kill", "block_runs"}; raises at the first loss."""
    from transformers import AutoModelForCausalLM

    scenario = Scenario(folder)
    results = []
    for point in points:
        outcomes: Counter[str] = Counter()
        t0 = time.perf_counter()
        for i in range(trials):
            outcomes[scenario.trial(point)] += 1
            if i % 10 == 0:
                AutoModelForCausalLM.from_pretrained(folder)  # what the next server start loads
        results.append({"point": point, "trials": trials, "outcomes": dict(outcomes), "losses": 0,
                        "seconds_per_kill": round((time.perf_counter() - t0) / trials, 3), "block_runs": scenario.runs})
    return results


if __name__ == "__main__":
    names, trials, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    for result in run(list(EXPECT) if names == "all" else names.split(","), trials, folder):
        print(json.dumps(result), flush=True)
