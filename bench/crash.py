"""kill -9 at every named crash point, many times: the figures in docs/finetuning.md.

    ./dev bench crash [--trials 100] [--points all|sync.committed,...] [--write]

Each kill is deterministic (the child process SIGKILLs itself at the point: amygdala.crash), so
the count of kills is the count of windows tested, not a hope that random timing hit them. Per
point: the outcome after recovery (wholly old or wholly new, weights and optimizer state
together), losses (torn or mixed: must be 0) and the time per kill against a plain sync of the
same folder measured in the same run. The driver is tests/helpers/crash.py, the same one
tests/test_checkpoint_crash.py runs 20 times per point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "finetuning.md"


def plain_sync_seconds(folder: Path) -> float:
    """The same scenario's sync, not killed: the baseline a kill-and-recover is compared with."""
    code = ("import time, torch; torch.set_num_threads(1)\n"
            "from tests.helpers.crash import Scenario\n"
            f"s = Scenario(__import__('pathlib').Path({str(folder)!r})); s.restore()\n"
            "t0 = time.perf_counter(); s.trainer.sync(); print(time.perf_counter() - t0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("AMYGDALA_CRASH_AT", None)
    env.pop("AMYGDALA_CRASH_FILE", None)
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="kills per point")
    ap.add_argument("--points", default="all", help="comma-separated crash points (amygdala.crash.POINTS) or all")
    ap.add_argument("--write", action="store_true", help="write the table into docs/finetuning.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = plain_sync_seconds(Path(tmp) / "base")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "tests.helpers.crash", args.points, str(args.trials), str(Path(tmp) / "kill")],
                             cwd=ROOT, env=_env(), capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"a kill lost data or missed its window:\n{run.stderr[-3000:]}")
        results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    total = sum(r["trials"] for r in results)
    lines = [f"`./dev bench crash --trials {args.trials}`: {total} kills, {len(results)} crash points, "
             f"{sum(r['losses'] for r in results)} losses ({time.perf_counter() - t0:.0f} s; a plain sync of the tiny "
             f"folder takes {1000 * baseline:.0f} ms in the same run).", "",
             "| crash point | kills | after recovery | losses | time per kill and recovery vs a plain sync |",
             "|---|---|---|---|---|"]
    for r in results:
        outcome = ", ".join(f"{k} ({v})" for k, v in r["outcomes"].items())
        lines.append(f"| `{r['point']}` | {r['trials']} | {outcome} | {r['losses']} | {r['seconds_per_kill'] / baseline:.1f}x |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        sys.path.insert(0, str(ROOT / "bench"))
        from validity import replace_block

        replace_block(DOC, "crash", body)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
