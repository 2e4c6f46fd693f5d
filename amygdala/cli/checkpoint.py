"""``amygdala checkpoint sync`` / ``diagnose``: the model folder as a checkpoint (:mod:`amygdala.checkpoint`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- checkpoint sync|diagnose
def cmd_checkpoint(args: argparse.Namespace) -> int:
    """sync: replay an interrupted sync, or write --from's tensors as changed blocks; diagnose: report."""
    from amygdala import checkpoint

    if args.checkpoint_command == "sync":
        served = checkpoint.load_tensors(args.source) if args.source else {}
        if served:
            print(checkpoint.sync(args.model_dir, served, wait=args.wait).summary())
        else:
            replayed = checkpoint.recover(args.model_dir, wait=args.wait)
            print("nothing pending" if replayed is None else f"replayed an interrupted sync: {replayed} block(s)")
        return 0
    served = checkpoint.load_tensors(args.against) if args.against else None
    diagnosis = checkpoint.diagnose(args.model_dir, served)
    print("\n".join(diagnosis.lines()))
    return 0 if diagnosis.clean else 1


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="the model folder as a checkpoint: block-level sync, diagnosis")
    ksub = p.add_subparsers(dest="checkpoint_command", required=True)
    k = ksub.add_parser("sync", help="finish an interrupted sync; with --from, write those tensors' changed blocks")
    k.add_argument("--model-dir", type=Path, required=True)
    k.add_argument("--from", dest="source", type=Path, default=None, help="safetensors file or folder (served or checkpoint names)")
    k.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for another writer of the folder (a server's sync) before giving up (30)")
    k.set_defaults(func=cmd_checkpoint)
    k = ksub.add_parser("diagnose", help="pending journal, leftovers, and what differs from --against (exit 1 unless clean)")
    k.add_argument("--model-dir", type=Path, required=True)
    k.add_argument("--against", type=Path, default=None, help="safetensors file or folder to compare with")
    k.set_defaults(func=cmd_checkpoint)


def add_parsers(sub) -> None:
    _add_checkpoint(sub)
