"""``amygdala read`` and ``amygdala generate``: per-token readout of a text, steered generation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from amygdala.fields import parse_assignments
from amygdala.cli.common import _model_arg, _placement_args, _readout_arg

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- filter
def _filter_args(p) -> None:
    p.add_argument("--concepts", default=None, metavar="A,B", help="show only these concepts")
    p.add_argument("--clusters", default=None, metavar="X,Y", help="show only the concepts of these clusters (with --concepts: both)")
    p.add_argument("--layers", default=None, metavar="L,M", help="show only these of the readout's layers")
    p.add_argument("--summary", action="store_true",
                   help="one summary instead of per-token rows: per layer the mean and max of each shown "
                        "concept over the tokens (the server's readout \"summary\")")


def _filter(args: argparse.Namespace, readout):
    """The shown slice (amygdala.readout.filter), checked before the model loads; None: everything."""
    from amygdala.cli.common import _int_list
    from amygdala.readout.filter import ReadoutFilter

    def names(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    concepts, clusters = names(args.concepts), names(args.clusters)
    layers = _int_list("--layers", args.layers) if args.layers else None
    if not (concepts or clusters or layers):
        return None
    return ReadoutFilter.build(readout, concepts=concepts, clusters=clusters, layers=layers,
                               where={"concepts": "--concepts", "clusters": "--clusters", "layers": "--layers"})


def _print_summary(scored, readout, filt, top: int, as_json: bool) -> None:
    """``--summary``: the mean and max over the tokens per shown layer and concept, the same
    numbers a server's ``readout_summary`` holds; as text, per layer the ``top`` concepts by mean."""
    from amygdala.readout.filter import ReadoutFilter

    shown = filt or ReadoutFilter.everything(readout)
    summary = shown.summary_of(scored)
    if as_json:
        json.dump({"concepts": list(shown.names), "layers": list(shown.layer_ids), "zscore": readout.has_stats,
                   "against": scored.against, "smooth": scored.smooth, "summary": summary}, sys.stdout, indent=1)
        print()
        return
    unit = f"z-scores over {scored.against} text" if readout.has_stats else "raw projections"
    print(f"{summary['tokens']} tokens ({unit}; the attention sink left out)")
    if summary["mean"] is None:
        return
    for j, layer in enumerate(shown.layer_ids):
        means, peaks = summary["mean"][j], summary["max"][j]
        order = sorted(range(len(shown.names)), key=lambda k: -means[k])[:top]
        print(f"L{layer}: " + ", ".join(f"{shown.names[k]} mean {means[k]:+.2f} max {peaks[k]:+.2f}" for k in order))


# --------------------------------------------------------------------------- read
def _print_rows(rows: list[dict], unit: str) -> None:
    for r in rows:
        if r.get("attention_sink"):
            print(f"{r['position']:>4} {r['token']!r:<16} (attention sink: no comparable score at position 0)")
            continue
        cells = "  ".join(
            f"L{l}: " + ", ".join(f"{c} {v:+.1f}" for c, v in top) for l, top in r["layers"].items()
        )
        tracks = "".join(f"{name[:4]} {v:+.1f}  " for name, v in r.get("tracks", {}).items())
        print(f"{r['position']:>4} {r['token']!r:<16} {tracks}{cells}")
    print(f"({unit}; top concepts per layer)")


def cmd_read(args: argparse.Namespace) -> int:
    from amygdala.models import load_model
    from amygdala.pipeline import matching_model
    from amygdala.models.weights import require_same_weights
    from amygdala import AmygdalaError
    from amygdala.readout import DEFAULT_SMOOTH, Readout, score_text
    from amygdala.readout.filter import text_rows

    if (args.text is None) == (args.file is None):
        raise AmygdalaError("read: give either TEXT or --file FILE (exactly one of the two)")
    if args.file is not None and (args.out is None or args.html is not None or args.json or args.summary):
        raise AmygdalaError("read --file: needs --out TABLE (.parquet, .csv, .jsonl), which holds a summary "
                            "per text; --html, --json and --summary are for one TEXT")
    if args.file is None and (args.out is not None or args.tokens):
        raise AmygdalaError("read: --out and --tokens go with --file")
    readout = Readout.load(args.readout)
    filt = _filter(args, readout)
    smooth = DEFAULT_SMOOTH if args.smooth is None else args.smooth
    if smooth < 1:
        raise AmygdalaError(f"--smooth {smooth}: the window is a number of tokens, at least 1")
    if args.batch_size < 1:
        raise AmygdalaError(f"--batch-size {args.batch_size}: at least 1")
    if args.file is not None:
        from amygdala.readout.dataset import check_paths

        check_paths(args.file, args.out)  # a bad input or output fails before the model loads
    if args.against is not None:
        readout.stats_for(args.against)  # a readout without that set fails before the model loads
    info = matching_model(readout, args.model)
    require_same_weights(readout.weights, info.path, allow=args.allow_other_weights, where=str(args.readout))
    model, tokenizer, _ = load_model(info.path, args.device, args.model_dtype)
    if args.file is not None:
        return _read_file(args, model, tokenizer, readout, smooth, filt)
    scored = score_text(model, tokenizer, readout, args.text, against=args.against, smooth=smooth)
    rows = text_rows(scored, readout, filt, args.top)
    if args.html is not None:
        from amygdala.view import conversation_of_text, offline_html

        conversation = conversation_of_text(readout, scored, text=args.text, model=info.name)
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(offline_html(conversation), encoding="utf-8")
        print(f"wrote {args.html} (open it in a browser; no server needed)", file=sys.stderr)
    if args.summary:
        _print_summary(scored, readout, filt, args.top, args.json)
    elif args.json:
        select = {} if filt is None else {"select": filt.describe()}
        json.dump({"layers": list(filt.layer_ids) if filt else readout.layers, **select, "zscore": readout.has_stats, "against": scored.against,
                   "construction": readout.construction, "smooth": scored.smooth,
                   "tracks": scored.track_names or [], "tokens": rows}, sys.stdout, indent=1)
        print()
    else:
        unit = f"z-scores over {scored.against} text" if readout.has_stats else "raw projections"
        if scored.smooth > 1:
            unit += f", averaged over the last {scored.smooth} tokens"
        if scored.track_names:
            unit += "; emot/vale: emotionality and valence tracks, z over neutral text"
        _print_rows(rows, unit)
    return 0


def _read_file(args: argparse.Namespace, model, tokenizer, readout, smooth: int, filt) -> int:
    from tqdm import tqdm

    from amygdala.readout.dataset import read_items, score_file

    total = len(read_items(args.file))
    bar = tqdm(total=total, unit="text", desc="read", disable=args.quiet or not sys.stderr.isatty())
    try:
        new, old = score_file(model, tokenizer, readout, args.file, args.out, against=args.against, smooth=smooth,
                              top=args.top, tokens=args.tokens, batch_size=args.batch_size, select=filt,
                              on_batch=bar.update, on_resume=bar.update)
    finally:
        bar.close()
    print(f"wrote {args.out}: {new} texts scored" + (f", {old} already there (resumed)" if old else ""), file=sys.stderr)
    return 0


def _add_read(sub) -> None:
    p = sub.add_parser("read", help="per-token concept scores of a text, or a table of a file of texts")
    p.add_argument("text", nargs="?", default=None, help="one text (or --file)")
    p.add_argument("--file", type=Path, default=None, metavar="TEXTS",
                   help="score every text of a .txt (one per line), .jsonl (a \"text\" field, optional \"id\") "
                        "or .csv (a text column, optional id) file")
    p.add_argument("--out", type=Path, default=None, metavar="TABLE",
                   help="with --file: the table, .parquet (a folder of parts), .csv or .jsonl; rerunning resumes it")
    p.add_argument("--tokens", action="store_true", help="with --file: one row per token instead of per text")
    p.add_argument("--batch-size", type=int, default=16, help="with --file: texts per forward")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _readout_arg(p)
    _model_arg(p)
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use the readout even when the model's weight files differ from the ones it was built from")
    p.add_argument("--top", type=int, default=3)
    _filter_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="also write a self-contained page of the text's readout (the live page's snapshot, opens offline)")
    p.add_argument("--against", choices=("neutral", "emotional"), default=None,
                   help="z-score statistics: neutral (more X than plain prose?) or emotional (X rather than "
                        "another feeling?); default: the readout file's")
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="causal moving average over the last N tokens (1: none; default "
                        "amygdala.readout.DEFAULT_SMOOTH, 8)")
    p.set_defaults(func=cmd_read)


# --------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from amygdala.models import load_model
    from amygdala.pipeline import matching_model
    from amygdala.models.weights import require_same_weights
    from amygdala.readout import Readout, Steering, attach
    from amygdala.readout.filter import text_rows
    from amygdala.readout.runtime import check_placement
    from amygdala.readout.text import TextScores

    steer = parse_assignments(args.steer, "--steer", example="calm=4")  # before anything loads
    check_placement(args.steer_positions, args.steer_from)
    readout = Readout.load(args.readout)
    filt = _filter(args, readout)
    steering = Steering.from_concepts(readout, steer).placed(args.steer_positions, args.steer_from) if steer else None
    info = matching_model(readout, args.model)
    require_same_weights(readout.weights, info.path, allow=args.allow_other_weights, where=str(args.readout))
    model, tokenizer, _ = load_model(info.path, args.device, args.model_dtype)
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
    if args.show_readout or args.summary:
        scores = session.zscores() if readout.has_stats else session.scores()
        # The position that sampled generated token i is the one before it.
        first = ids.shape[1] - 1
        at = [first + i for i in range(len(new)) if first + i < scores.shape[1]]
        scored = TextScores([tokenizer.decode([int(t)]) for t in new[: len(at)].tolist()], at, scores[0, at], readout.has_stats,
                            against=readout.default_statistics if readout.has_stats else None)
        if args.summary:
            _print_summary(scored, readout, filt, args.top, as_json=False)
        else:
            _print_rows(text_rows(scored, readout, filt, args.top), "z-scores" if readout.has_stats else "raw projections")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with steering, optionally showing the readout")
    p.add_argument("prompt")
    _readout_arg(p)
    _model_arg(p)
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use the readout even when the model's weight files differ from the ones it was built from")
    p.add_argument("--steer", action="append", default=[], metavar="CONCEPT=STRENGTH")
    _placement_args(p)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    p.add_argument("--show-readout", action="store_true",
                   help="print each generated token's top concepts (with --summary: their mean and max instead)")
    p.add_argument("--top", type=int, default=3)
    _filter_args(p)
    p.set_defaults(func=cmd_generate)


def add_parsers(sub) -> None:
    _add_read(sub)
    _add_generate(sub)
