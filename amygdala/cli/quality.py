"""``amygdala quality``: the quality report's parser and handler."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from amygdala.cli.common import _corpus_arg, _load_corpus, _model_arg, _readout_arg

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- quality
def _quality_flags(p: argparse.ArgumentParser) -> None:
    from amygdala.quality.config import CLI_FIELDS, QualityConfig

    g = p.add_argument_group("quality report thresholds (defaults: the original system's)")
    for name, text in CLI_FIELDS.items():
        default = getattr(QualityConfig, name)
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=default, help=f"{text} (default {default})")


def _quality_config(args: argparse.Namespace):
    from amygdala.quality.config import CLI_FIELDS, QualityConfig

    return QualityConfig(**{name: getattr(args, name) for name in CLI_FIELDS})


def _print_quality(report: dict, paths) -> None:
    from amygdala.quality.report import triage_table

    print(triage_table(report))
    print(f"wrote {paths[0]} + {paths[1].name}")


def cmd_quality(args: argparse.Namespace) -> int:
    from amygdala.quality.run import JSON_NAME, HTML_NAME, run_quality

    config = _quality_config(args)
    corpus = _load_corpus(args)
    report = run_quality(
        args.readout, corpus, args.out, model=args.model, device=args.device, dtype=args.model_dtype, cfg=config,
        batch_size=args.batch_size, progress=not args.quiet,
    )
    _print_quality(report, (args.out / JSON_NAME, args.out / HTML_NAME))
    return 0


def _add_quality(sub) -> None:
    p = sub.add_parser("quality", help="quality.json + report.html: clean, fragmented, redundant, wrong-cluster concepts")
    _readout_arg(p)
    _corpus_arg(p)
    _model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output folder for quality.json + report.html")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _quality_flags(p)
    p.set_defaults(func=cmd_quality)


def add_parsers(sub) -> None:
    _add_quality(sub)
