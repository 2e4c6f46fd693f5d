"""``amygdala corpus check`` / ``stats``: parser and handlers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from amygdala.cli.common import _model_arg

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- corpus check
def cmd_corpus_check(args: argparse.Namespace) -> int:
    from amygdala.corpus import bundled_corpus
    from amygdala.corpus.check import check_corpus, summary

    root = args.dir or bundled_corpus()
    readout = None
    if args.readout is not None:
        from amygdala.readout import Readout

        readout = Readout.load(args.readout)  # a bad file fails before the lint and the model
    problems, warned, corpus = check_corpus(root)
    for w in warned:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(p)
    if corpus is not None and not args.quiet:
        print("\n".join(summary(corpus)), file=sys.stderr)
    if corpus is not None and readout is not None:
        problems += _emotional_neutral(args, readout, corpus)
    print(f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _emotional_neutral(args: argparse.Namespace, readout, corpus) -> list[str]:
    """The neutral texts that read as emotional under ``--readout``: a problem each; the worst 10 shown."""
    from amygdala.quality.neutral import check_neutral

    rows = check_neutral(readout, corpus, args.model, args.device, progress=not args.quiet, dtype=args.model_dtype)
    flagged = [r for r in rows if r["flagged"]]
    for r in flagged:
        print(f"{r['where']}: neutral text reads as {r['concept']} (score {r['score']:+.2f}, the median {r['concept']} "
              f"text scores {r['median_positive']:+.2f}); rewrite it without the feeling, or move it to that concept")
    print("most emotional neutral texts (score - median score of the concept's own texts):", file=sys.stderr)
    for r in rows[:10]:
        print(f"  {r['margin']:+.2f}  {r['where']}  {r['concept']}", file=sys.stderr)
    return [r["where"] for r in flagged]


def cmd_corpus_stats(args: argparse.Namespace) -> int:
    from amygdala.corpus import bundled_corpus, load_corpus
    from amygdala.corpus.stats import cluster_stats, concept_stats, table

    corpus = load_corpus(args.dir or bundled_corpus())
    rows = concept_stats(corpus, args.nearest)
    clusters = cluster_stats(corpus, rows)
    if args.json:
        json.dump({"concepts": rows, "clusters": clusters}, sys.stdout, indent=1)
        print()
    else:
        print(table(rows, clusters))
    return 0


def _add_corpus(sub) -> None:
    p = sub.add_parser("corpus", help="corpus tools")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    c = csub.add_parser("check", help="lint a corpus folder (exit 1 when it has problems)")
    c.add_argument("dir", type=Path, nargs="?", default=None, help="corpus folder (default: the bundled corpus)")
    c.add_argument("--quiet", action="store_true", help="no summary")
    c.add_argument("--readout", type=Path, default=None,
                   help="also flag neutral texts that read as emotional under this readout (runs the model)")
    _model_arg(c)
    c.set_defaults(func=cmd_corpus_check)
    c = csub.add_parser("stats", help="per concept and cluster: counts, settings, words, nearest concepts by text overlap")
    c.add_argument("dir", type=Path, nargs="?", default=None, help="corpus folder (default: the bundled corpus)")
    c.add_argument("--nearest", type=int, default=5, help="how many nearest concepts to list")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_corpus_stats)


def add_parsers(sub) -> None:
    _add_corpus(sub)
