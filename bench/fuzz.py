"""The long fuzz run of every reader of outside input (issue 24; the short one is tests/test_fuzz_readers.py).

Usage: ./dev bench fuzz [--examples N] [--readers a,b] [--seed S]
Prints, per reader, the inputs tried, how many parsed / were refused (an AmygdalaError), and the
failures: hangs (> 2 s), memory (> 512 MiB traced peak) and crashes (any other exception), each
with its first input saved under out/fuzz-failures/. Writes out/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, given, settings  # noqa: E402

from helpers import fuzz  # noqa: E402


def run_reader(name: str, seeds: list[bytes], folder: Path, examples: int, seed: int, failures: Path) -> dict:
    read = fuzz.READERS[name]
    counts: Counter = Counter()
    t0 = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz.mutated(seeds))
    def run(data):
        try:
            counts[fuzz.bounded(read, data, folder)] += 1
        except fuzz.Hang:
            counts["hang"] += 1
            _keep(failures, name, "hang", data)
        except fuzz.TooMuchMemory:
            counts["memory"] += 1
            _keep(failures, name, "memory", data)
        except Exception as e:  # noqa: BLE001 (counted: any exception but AmygdalaError is a finding)
            counts["crash"] += 1
            _keep(failures, name, f"crash-{type(e).__name__}", data)

    run._hypothesis_internal_use_seed = seed  # reproducible: the same inputs for the same --seed
    run()
    tried = sum(counts.values())
    return {"reader": name, "inputs": tried, "parsed": counts["ok"], "refused": counts["refused"], "hangs": counts["hang"],
            "memory": counts["memory"], "crashes": counts["crash"], "seconds": round(time.perf_counter() - t0, 1)}


def _keep(failures: Path, name: str, kind: str, data: bytes) -> None:
    failures.mkdir(parents=True, exist_ok=True)
    path = failures / f"{name}-{kind}.bin"
    if not path.exists():
        path.write_bytes(data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100_000, help="inputs per reader (default 100000)")
    p.add_argument("--readers", default=",".join(sorted(fuzz.READERS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "fuzz.json")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="amygdala-fuzz-"))
    seeds = fuzz.make_seeds(folder)
    rows = []
    for name in args.readers.split(","):
        row = run_reader(name, seeds[name], folder, args.examples, args.seed, args.out.parent / "fuzz-failures")
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    bad = sum(r["hangs"] + r["memory"] + r["crashes"] for r in rows)
    print(f"{sum(r['inputs'] for r in rows)} inputs over {len(rows)} readers: {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
