"""``amygdala build`` (alias ``train``) and ``amygdala demo``: parser and handler side by side."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.fields import parse_assignments
from amygdala.cli.common import _corpus_arg, _load_corpus, _model_arg
from amygdala.cli.quality import _print_quality, _quality_config, _quality_flags
from amygdala.cli.read import _print_rows

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- train
def _method_params(args: argparse.Namespace) -> dict[str, str | int]:
    """--method-param NAME=VALUE items and --subspace-eigen-k (train() checks names and types)."""
    params: dict[str, str | int] = parse_assignments(args.method_param, "--method-param", numbers=False, example="C=0.1")
    if args.subspace_eigen_k is not None:
        if args.method != "subspace":
            raise AmygdalaError(f"--subspace-eigen-k applies to --method subspace, not {args.method}")
        params["eigen_k"] = args.subspace_eigen_k
    return params


def cmd_build(args: argparse.Namespace) -> int:
    from amygdala.pipeline import BuildConfig, build

    if args.command == "train":
        print("note: `amygdala train` is now `amygdala build` (it builds concept vectors; fine-tuning the model is "
              "the server's /train); the old name keeps working", file=sys.stderr)
    corpus = _load_corpus(args)
    if args.concepts:
        corpus = corpus.subset([c.strip() for c in args.concepts.split(",") if c.strip()])
    config = BuildConfig(
        model=args.model, layers=args.layers, method=args.method, method_params=_method_params(args),
        pooling=args.pooling, min_positives=args.min_positives,
        chat_template=args.chat_template, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, model_dtype=args.model_dtype, progress=not args.quiet, construction=args.construction, statistics=args.statistics,
    )
    quality = _quality_config(args) if args.quality_report else None  # bad thresholds fail first
    config.quality_sites = quality is not None
    result = build(corpus, config, args.out)
    r = result.readout
    print(f"wrote {args.out}/readout.safetensors + readout.json: {len(r.concepts)} concepts x layers {r.layers}, "
          f"{len(result.activations.texts)} unique texts in {result.activations.seconds:.1f} s")
    if quality is not None:
        from amygdala.quality.run import from_build, write

        report = from_build(result, corpus, quality)
        _print_quality(report, write(report, quality, args.out))
    return 0


# --------------------------------------------------------------------------- parser
def _add_build(sub) -> None:
    from amygdala.activations import DEFAULT_POOLING
    from amygdala.methods import METHODS

    for name, text in (("build", "build concept vectors from a corpus and write a readout file"),
                       ("train", "old name of `build` (kept as an alias)")):
        p = sub.add_parser(name, help=text)
        _corpus_arg(p, pairs=True)
        _model_arg(p, dtype_flags=("--model-dtype",))  # --dtype here is the stored vectors' (older flag)
        p.add_argument("--layers", default="0.5,0.66", help="indices (10,15,20) or relative depths (0.5,0.66)")
        p.add_argument("--method", default="diffmean", help=f"{', '.join(METHODS)} (docs/methods.md; default diffmean)")
        p.add_argument("--method-param", action="append", default=[], metavar="NAME=VALUE",
                       help="a method parameter, e.g. C=0.1 for logistic, variance=0.5 for denoised (repeatable)")
        p.add_argument("--subspace-eigen-k", type=int, default=None,
                       help="subspace: how many top eigenvectors to weight together (default 5)")
        p.add_argument("--pooling", default=DEFAULT_POOLING,
                       help=f"which tokens make a text's row: last, mean, mean_from=K (default {DEFAULT_POOLING}; docs/validity.md)")
        p.add_argument("--out", type=Path, required=True, help="output folder for readout.safetensors + readout.json")
        p.add_argument("--concepts", default=None, help="comma-separated subset of the manifest's concepts")
        p.add_argument("--min-positives", type=int, default=3, help="fail when a concept has fewer positive texts")
        p.add_argument("--chat-template", action="store_true", help="read texts as the assistant turn of a chat")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of stored vectors")
        p.add_argument("--construction", default="mean_removed", choices=["mean_removed", "as_built"],
                       help="mean_removed (default): the concepts' shared direction out, kept as the emotionality "
                            "track; as_built: the method's vectors as they are (docs/readout-format.md)")
        p.add_argument("--statistics", default="emotional", choices=["emotional", "neutral"],
                       help="the z-scores' default statistics in the file (both are stored; read --against picks)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--quality-report", action="store_true",
                       help="also write OUT/quality.json + OUT/report.html from the same forward pass")
        _quality_flags(p)
        p.set_defaults(func=cmd_build)


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: default model, bundled corpus, build (or reuse), read a sample sentence."""
    from amygdala.models import load_model
    from amygdala.pipeline.demo import demo_readout
    from amygdala.readout import Readout, read_text

    loaded, how = demo_readout(args.out, layers=args.layers, method=args.method, pooling=args.pooling,
                               all_concepts=args.all, rebuild=args.rebuild)
    print(f"readout written to {args.out}: {how}")
    model, tokenizer, _ = loaded or load_model("default", None)
    rows = read_text(model, tokenizer, Readout.load(args.out), args.text, top=3)
    _print_rows(rows, "z-scores over neutral text")
    return 0


def _add_demo(sub) -> None:
    from amygdala.activations import DEFAULT_POOLING
    from amygdala.pipeline.demo import DEMO_SENTENCE

    p = sub.add_parser("demo", help="build on the bundled corpus with the default model and read a sentence")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--layers", default="0.5,0.66")
    p.add_argument("--method", default="diffmean")
    p.add_argument("--pooling", default=DEFAULT_POOLING)
    p.add_argument("--all", action="store_true", help="every concept of the corpus (minutes), not the demo's 12")
    p.add_argument("--rebuild", action="store_true", help="build again even when a cached readout fits")
    p.add_argument("--text", default=DEMO_SENTENCE)
    p.set_defaults(func=cmd_demo)


def add_parsers(sub) -> None:
    _add_build(sub)
    _add_demo(sub)
