"""``amygdala eval``: the validity evaluation (:mod:`amygdala.validity`), parser and handler."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.cli.common import _corpus_arg, _load_corpus, _model_arg, _readout_arg

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from amygdala.validity.run import report_text, run_eval, write
    from amygdala.validity.steering import SteeringConfig

    if args.steer_concepts and args.no_steering:
        raise AmygdalaError("--steer-concepts and --no-steering contradict each other; drop one")
    steering = None if args.no_steering else SteeringConfig(
        concepts=[c.strip() for c in (args.steer_concepts or "").split(",") if c.strip()],
        max_new_tokens=args.max_new_tokens,
    )
    corpus = _load_corpus(args)
    result = run_eval(args.readout, corpus, model=args.model, device=args.device, dtype=args.model_dtype, steering=steering,
                      batch_size=args.batch_size, progress=not (args.quiet or args.json))
    if args.out is not None:
        paths = write(result, args.out)
        print(f"wrote {paths[0]} + {paths[1].name}", file=sys.stderr)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(report_text(result))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out accuracy, valence/arousal geometry and steering efficacy of a readout")
    _readout_arg(p)
    _corpus_arg(p)
    _model_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write OUT/eval.json + OUT/eval.html")
    p.add_argument("--no-steering", action="store_true", help="skip the steering check (no generation)")
    p.add_argument("--steer-concepts", default=None,
                   help="comma-separated concepts to steer toward (default: the 3 most positive and 3 most negative by valence)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt in the steering check")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def add_parsers(sub) -> None:
    _add_eval(sub)
