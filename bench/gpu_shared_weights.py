"""Two processes, one copy of the weights: a trainer steps on views of another process's tensors.

    python bench/gpu_shared_weights.py                       # CUDA: IPC handles, default model, AdamW vs APOLLO-Mini
    python bench/gpu_shared_weights.py --device cpu --model tiny   # the same through shared memory (tests run this)

The parent stands in for vLLM: it holds the weights, merged the way vLLM serves them
(``qkv_proj``, ``gate_up_proj``), and a transformers model built on views of them. For each
optimizer a child process receives handles to the weights (CUDA IPC on a GPU, /dev/shm files on
CPU; :func:`amygdala.finetune.shared_weights.export_handles`), builds its own view model, checks that every
parameter aliases the parent's memory, and takes SFT steps in place. The parent then checks,
without reloading anything, that its tensors hold exactly the child's result and that its own
model's logits moved. Reported per optimizer: step time, optimizer state bytes, and the child's
peak memory (CUDA: allocated by the child, i.e. grads + optimizer state + activations; the
weights are the parent's). Exit 1 when a check fails.

Needs torch and transformers only (no vLLM). ``--model default`` uses the converted
SmolLM2-135M-Instruct when it is on this machine, else random weights in its shape (memory
does not depend on the values; the output says which).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too

import torch  # noqa: E402

from tests.helpers.shared_weights import run  # noqa: E402  (the experiment, shared with the tests)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (IPC handles) or cpu (shared memory)")
    ap.add_argument("--model", default="default", help="default | tiny | a model folder")
    ap.add_argument("--optimizers", default="adamw,apollo-mini")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for the shared-memory variant", file=sys.stderr)
        return 2
    summary = run(args.device, args.model, args.optimizers.split(","), args.steps, args.lr, args.threads)
    if args.json:
        print(json.dumps(summary))
        return 0 if summary["ok"] else 1
    print(f"{summary['device']}, {summary['weights']}, {summary['dtype']}, torch {summary['torch']}")
    mem = "peak_allocated_bytes" if args.device.startswith("cuda") else "max_rss_bytes"
    print(f"{'optimizer':<12} {'step s':>8} {'state MiB':>10} {'child ' + mem.split('_')[0] + ' MiB':>16} {'loss':>15}  checks")
    for r in summary["results"]:
        print(f"{r['kind']:<12} {r['step_s']:>8.3f} {r['state_bytes'] / 2**20:>10.2f} {r[mem] / 2**20:>16.1f} "
              f"{r['loss_first']:>7.3f}->{r['loss_last']:<7.3f}  {'ok' if r['ok'] else 'FAILED'} "
              f"(parent logits moved {r['parent_logits_moved']:.2e})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
