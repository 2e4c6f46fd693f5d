"""``amygdala <job>``: one subcommand per job, each a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from amygdala import AmygdalaError, __version__

log = logging.getLogger("amygdala")

#: The corpus bundled with the source tree (used when --corpus is not given).
BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "corpus"


def _corpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, default=None, help=f"corpus folder (default: {BUNDLED_CORPUS})")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _parse_steer(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise AmygdalaError(f"--steer {item!r}: expected CONCEPT=STRENGTH, e.g. calm=4")
        try:
            out[name.strip()] = out.get(name.strip(), 0.0) + float(value)
        except ValueError:
            raise AmygdalaError(f"--steer {item!r}: strength {value!r} is not a number") from None
    return out


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from amygdala.corpus import load_corpus
    from amygdala.extract import TrainConfig, train

    corpus = load_corpus(
        args.corpus or (BUNDLED_CORPUS if args.direct_dir is None else None),
        direct_dir=args.direct_dir,
        include_direct=not args.no_direct,
    )
    if args.concepts:
        corpus = corpus.subset([c.strip() for c in args.concepts.split(",") if c.strip()])
    config = TrainConfig(
        model=args.model, layers=args.layers, method=args.method, min_positives=args.min_positives,
        chat_template=args.chat_template, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, progress=not args.quiet,
    )
    result = train(corpus, config, args.out)
    r = result.readout
    print(f"wrote {args.out}/readout.safetensors + readout.json: {len(r.concepts)} concepts x layers {r.layers}, "
          f"{len(result.activations.texts)} unique texts in {result.activations.seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------- read
def _top(row, concepts: list[str], k: int) -> list[tuple[str, float]]:
    vals, idx = row.topk(min(k, len(concepts)))
    return [(concepts[i], float(v)) for v, i in zip(vals, idx)]


def read_text(model, tokenizer, readout, text: str, top: int = 3) -> list[dict]:
    """Per-token top concepts per layer (z-scores when the readout has statistics)."""
    import torch

    from amygdala.readout import attach

    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode(), attach(model, readout) as session:
        model(**enc)
    scores = session.zscores() if readout.has_stats else session.scores()
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    special = set(tokenizer.all_special_ids)
    rows = []
    for pos, (tok, tid) in enumerate(zip(tokens, enc["input_ids"][0].tolist())):
        if tid in special:
            continue
        rows.append({
            "position": pos,
            "token": tokenizer.decode([tid]),
            "layers": {str(l): _top(scores[0, pos, j], readout.concepts, top) for j, l in enumerate(readout.layers)},
        })
    return rows


def _print_rows(rows: list[dict], unit: str) -> None:
    for r in rows:
        cells = "  ".join(
            f"L{l}: " + ", ".join(f"{c} {v:+.1f}" for c, v in top) for l, top in r["layers"].items()
        )
        print(f"{r['position']:>4} {r['token']!r:<16} {cells}")
    print(f"({unit}; top concepts per layer)")


def cmd_read(args: argparse.Namespace) -> int:
    from amygdala.models import load_model, model_info, resolve_model
    from amygdala.readout import Readout

    readout = Readout.load(args.readout)
    info = model_info(resolve_model(args.model))
    readout.check_model(info.num_layers, info.hidden_size, info.name)
    model, tokenizer, _ = load_model(info.path, args.device)
    rows = read_text(model, tokenizer, readout, args.text, args.top)
    if args.json:
        json.dump({"layers": readout.layers, "zscore": readout.has_stats, "tokens": rows}, sys.stdout, indent=1)
        print()
    else:
        _print_rows(rows, "z-scores over neutral text" if readout.has_stats else "raw projections")
    return 0


# --------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from amygdala.models import load_model, model_info, resolve_model
    from amygdala.readout import Readout, Steering, attach

    readout = Readout.load(args.readout)
    steer = _parse_steer(args.steer)
    steering = Steering.from_concepts(readout, steer) if steer else None  # validates names first
    info = model_info(resolve_model(args.model))
    readout.check_model(info.num_layers, info.hidden_size, info.name)
    model, tokenizer, _ = load_model(info.path, args.device)
    if getattr(tokenizer, "chat_template", None) and not args.raw:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    with torch.inference_mode(), attach(model, readout, steering=steering) as session:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    if args.show_readout:
        scores = session.zscores() if readout.has_stats else session.scores()
        # The position that sampled generated token i is the one before it.
        first = ids.shape[1] - 1
        rows = [
            {"position": first + i, "token": tokenizer.decode([int(t)]),
             "layers": {str(l): _top(scores[0, first + i, j], readout.concepts, args.top) for j, l in enumerate(readout.layers)}}
            for i, t in enumerate(new.tolist()) if first + i < scores.shape[1]
        ]
        _print_rows(rows, "z-scores" if readout.has_stats else "raw projections")
    return 0


# --------------------------------------------------------------------------- corpus check
def cmd_corpus_check(args: argparse.Namespace) -> int:
    from amygdala.corpus.check import check_corpus, summary

    problems, warned, corpus = check_corpus(args.dir)
    for w in warned:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(p)
    if corpus is not None and not args.quiet:
        print("\n".join(summary(corpus)), file=sys.stderr)
    print(f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


# --------------------------------------------------------------------------- demo
DEMO_SENTENCE = "My hands were shaking as I opened the envelope, and then I laughed out loud: I got in."


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: default model, bundled corpus, train, read a sample sentence."""
    from amygdala.corpus import load_corpus
    from amygdala.extract import TrainConfig, train

    corpus = load_corpus(BUNDLED_CORPUS)
    result = train(corpus, TrainConfig(layers=args.layers, method=args.method), args.out)
    print(f"readout written to {args.out}")
    rows = read_text(result.model, result.tokenizer, result.readout, args.text, top=3)
    _print_rows(rows, "z-scores over neutral text")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amygdala", description=__doc__)
    parser.add_argument("--version", action="version", version=f"amygdala {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train concept vectors and write a readout file")
    _corpus_arg(p)
    _model_arg(p)
    p.add_argument("--layers", default="0.5,0.66", help="indices (10,15,20) or relative depths (0.5,0.66)")
    p.add_argument("--method", default="diffmean", help="extraction method (default diffmean)")
    p.add_argument("--out", type=Path, required=True, help="output folder for readout.safetensors + readout.json")
    p.add_argument("--concepts", default=None, help="comma-separated subset of the manifest's concepts")
    p.add_argument("--min-positives", type=int, default=3, help="fail when a concept has fewer positive texts")
    p.add_argument("--direct-dir", type=Path, default=None, help="extra folder of direct 'I feel X.' descriptions")
    p.add_argument("--no-direct", action="store_true", help="ignore the corpus's own direct/ folder")
    p.add_argument("--chat-template", action="store_true", help="read texts as the assistant turn of a chat")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of stored vectors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("read", help="per-token concept scores of a text")
    p.add_argument("text")
    p.add_argument("--readout", type=Path, required=True)
    _model_arg(p)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("generate", help="generate with steering, optionally showing the readout")
    p.add_argument("prompt")
    p.add_argument("--readout", type=Path, required=True)
    _model_arg(p)
    p.add_argument("--steer", action="append", default=[], metavar="CONCEPT=STRENGTH")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    p.add_argument("--show-readout", action="store_true", help="print each generated token's top concepts")
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("corpus", help="corpus tools")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    c = csub.add_parser("check", help="lint a corpus folder (exit 1 when it has problems)")
    c.add_argument("dir", type=Path, nargs="?", default=BUNDLED_CORPUS)
    c.add_argument("--quiet", action="store_true", help="no summary")
    c.set_defaults(func=cmd_corpus_check)

    p = sub.add_parser("demo", help="train on the bundled corpus with the default model and read a sentence")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--layers", default="0.5,0.66")
    p.add_argument("--method", default="diffmean")
    p.add_argument("--text", default=DEMO_SENTENCE)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="amygdala: %(message)s",
    )
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; "Loading weights" is noise
    try:
        return args.func(args)
    except AmygdalaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
