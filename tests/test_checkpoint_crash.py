"""kill -9 at every named crash point of the sync and the training worker: the folder recovers to
wholly old or wholly new weights, with the optimizer state to match, every time.

Deterministic by construction: the child process SIGKILLs itself at the point (amygdala.crash),
so no sleep races the sync and the result does not depend on the machine's speed. The driver
(tests/helpers/crash.py, also ``./dev bench crash`` for 100 kills per point) runs in a fresh
interpreter because it forks; 20 kills per point here, the issue's "20 times in a row".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amygdala import crash
from helpers.crash import EXPECT

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 20


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("crash")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(crash.ENV, None)
    env.pop(crash.FILE_ENV, None)
    run = subprocess.run([sys.executable, "-m", "tests.helpers.crash", "all", str(TRIALS), str(folder)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {r["point"]: r for r in lines}


def test_every_point_in_the_code_has_an_expected_outcome():
    # read.* points are the dataset reader's (tests/test_read_dataset.py), not a folder's sync
    assert set(EXPECT) == {p for p in crash.POINTS if not p.startswith("read.")}
    source = "\n".join(p.read_text() for p in (ROOT / "amygdala").rglob("*.py"))
    for name in crash.POINTS:
        assert f'crash_point("{name}")' in source, f"{name} is listed but no code reaches it"


@pytest.mark.parametrize("point", list(EXPECT))
def test_kill_9_at_the_point_recovers_wholly_old_or_wholly_new(results, point):
    """Each trial: the child dies of SIGKILL at the point, the folder before recovery is that
    point's window (checked by the driver), and after recovery every changed tensor and the
    optimizer's step count are the old state or the new one together, as EXPECT says."""
    r = results[point]
    want, where = EXPECT[point]
    assert r["trials"] == TRIALS and r["losses"] == 0
    assert r["outcomes"] == {f"{want} {where}": TRIALS}, r


def test_a_crash_file_arms_a_point_at_run_time_and_names_the_process(tmp_path):
    """How a live server is killed at a point: the file is read at each hit, N counts from the
    moment it was written, and PATH.hit names the pid and the point."""
    path = tmp_path / "crash-at"
    code = ("import os, sys\n"
            "from amygdala.crash import crash_point\n"
            "for i in range(5):\n"
            "    crash_point('train.step')\n"
            "    print(i, flush=True)\n"
            "    if i == 1: open(sys.argv[1], 'w').write('train.step:2')\n")
    env = {**os.environ, crash.FILE_ENV: str(path), "PYTHONPATH": str(ROOT)}
    env.pop(crash.ENV, None)
    run = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert run.stdout.split() == ["0", "1", "2"]  # armed after step 1: the 2nd hit after that (i = 3) kills
    pid, point = (tmp_path / "crash-at.hit").read_text().split()
    assert point == "train.step:2" and int(pid) > 0
    assert not path.exists()  # a restarted process is not armed again


@pytest.mark.parametrize("value, message", [
    ("sync.nowhere", "unknown crash point 'sync.nowhere'"),
    ("train.step:x", "N must be a whole number"),
    ("train.step:0", "N must be 1 or more"),
])
def test_a_bad_crash_spec_is_refused_naming_the_variable(value, message, monkeypatch):
    monkeypatch.setenv(crash.ENV, value)
    with pytest.raises(ValueError, match=message) as e:
        crash.crash_point("train.step")
    assert crash.ENV in str(e.value)


def test_a_point_the_code_does_not_list_is_a_programming_error():
    with pytest.raises(ValueError, match="not in amygdala.crash.POINTS"):
        crash.crash_point("sync.typo")
