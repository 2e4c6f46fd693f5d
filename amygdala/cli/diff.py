"""``amygdala diff A B``: two readouts compared (readout/compare.py), parser and handler."""

from __future__ import annotations

import argparse
import json


def cmd_diff(args: argparse.Namespace) -> int:
    from amygdala.readout.compare import compare_folders, diff_table

    d = compare_folders(args.a, args.b)
    print(json.dumps(d, indent=1) if args.json else diff_table(d))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("diff", help="per-concept cosine per layer between two readouts, and their evals")
    p.add_argument("a", help="readout folder (or repo id in the local Hugging Face cache)")
    p.add_argument("b", help="the other readout")
    p.add_argument("--json", action="store_true", help="print the diff as JSON")
    p.set_defaults(func=cmd_diff)
