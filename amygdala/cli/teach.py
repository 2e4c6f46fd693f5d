"""``amygdala pairs | teach | dream | distill | rollback``: the teach loop's jobs (docs/teaching.md).

Parser and handler side by side per job; :func:`add_parsers` is the one line main.py calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.fields import parse_assignments


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="a file holding the server's training key (default: $AMYGDALA_API_KEY)")
    p.add_argument("--api-key", default=None,
                   help="the key itself: visible to every user in `ps`; prefer --api-key-file or $AMYGDALA_API_KEY")


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else --api-key (with a warning: argv shows in ps), else None ($AMYGDALA_API_KEY)."""
    if getattr(args, "api_key_file", None) is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AmygdalaError(f"--api-key-file {args.api_key_file}: cannot read ({e})") from None
        if not key:
            raise AmygdalaError(f"--api-key-file {args.api_key_file}: empty; write the key on its first line")
        return key
    if args.api_key is not None:
        print("amygdala: warning: --api-key shows the key to every user of this machine (ps); use --api-key-file "
              "or AMYGDALA_API_KEY", file=sys.stderr)
    return args.api_key


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="the running `amygdala serve`, e.g. http://127.0.0.1:8000")
    _key_args(p)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the served model's folder, for its tokenizer and chat template (default: the folder the server names)")
    p.add_argument("--raw", action="store_true", help="no chat template: text contexts are tokenized as they are")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p: argparse.ArgumentParser, objective: str, lr: float, steps: int) -> None:
    p.add_argument("--objective", default=objective, choices=["sft", "orpo", "dpo", "dpop"], help=f"default {objective}")
    p.add_argument("--learning-rate", type=float, default=lr, help=f"default {lr:g}")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer updates over all samples (default {steps})")
    # None: left to the server's defaults (docs/finetuning.md), so only what is given is sent
    p.add_argument("--anchor", type=float, default=None,
                   help="weight of the KL to the weights the job started from (default 0: off; 0.1-1 is gentle)")
    p.add_argument("--anchor-texts", type=Path, default=None, metavar="FILE",
                   help="neutral texts, one per line, the anchor also keeps in place (needs --anchor)")
    p.add_argument("--dpop-lambda", type=float, default=None, help="with --objective dpop: the penalty's weight (default 1)")
    p.add_argument("--holdout", type=float, default=None,
                   help="share of the samples held out for early stopping (default 0: off; e.g. 0.2)")
    p.add_argument("--patience", type=int, default=None,
                   help="with --holdout: stop after the held-out loss rose this many steps in a row (default 2)")


def _train_options(args: argparse.Namespace, encoder) -> dict:
    """The anchored-objective flags as ``/train`` config settings, checked here (a bad one must
    fail before anything is generated or trained), with the flag named."""
    from amygdala.fields import FieldError
    from amygdala.finetune.inputs import Limits, parse_config

    options = {key: getattr(args, key) for key in ("anchor", "dpop_lambda", "holdout", "patience")
               if getattr(args, key) is not None}
    if args.anchor_texts is not None:
        try:
            lines = [t for t in args.anchor_texts.read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise AmygdalaError(f"--anchor-texts {args.anchor_texts}: cannot read it ({e})") from None
        options["neutral"] = [list(encoder.tokenizer(t)["input_ids"]) for t in lines]
    try:
        parse_config(options, Limits(vocab_size=2**31, max_length=2**31))
    except FieldError as e:
        key = e.path.removeprefix("config.").split("[")[0]
        if key == "neutral":  # say which text: config.neutral[i] is the i-th non-empty line
            raise AmygdalaError(f"--anchor-texts {args.anchor_texts}: {e}") from None
        raise AmygdalaError(f"--{key.replace('_', '-')}: {str(e).partition(': ')[2]}") from None
    return options


def _generation_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per generated continuation (default 32)")
    p.add_argument("--out", type=Path, default=None, help=f"write the {what} here (JSONL samples)")


def _connect(args: argparse.Namespace):
    from amygdala.teach.client import Server
    from amygdala.teach.tokens import Encoder

    server = Server(args.server, _api_key(args))
    path = args.tokenizer or Path(server.model())
    if not path.is_dir():
        raise AmygdalaError(f"the server serves {str(path)!r}, not a folder here; give the model's folder with --tokenizer")
    encoder = Encoder.load(path, raw=args.raw)
    if hasattr(args, "anchor"):  # the jobs that train (_train_args)
        server.train_options = _train_options(args, encoder)
    return server, encoder


def _print_undo(server, snapshot: str) -> None:
    """The command that undoes a run: every training job restores its snapshot the same way."""
    print(f"undo: amygdala rollback --server {server.root} --snapshot {snapshot}")


def _write(path: Path | None, samples, what: str) -> None:
    from amygdala.teach.samples import write_samples

    if path is not None:
        print(f"wrote {write_samples(path, samples)} {what} to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- pairs
def cmd_pairs(args: argparse.Namespace) -> int:
    from amygdala.teach import convert

    if args.pairs_command == "transcripts":
        samples = convert.transcripts_to_samples(args.file)
        pairs = sum(s.rejected is not None for s in samples)
        _write(args.out, samples, f"samples ({pairs} chosen/rejected pairs, {len(samples) - pairs} single turns)")
        return 0
    thresholds = convert.Thresholds(parse_assignments(args.min, "--min"), parse_assignments(args.max, "--max"))
    if not thresholds.concepts:
        raise AmygdalaError("pairs notes: give at least one threshold, e.g. --min calm=0.7")
    if args.score_server and args.score_readout:
        raise AmygdalaError("--score-server and --score-readout: give one scorer")
    notes = convert.read_notes(args.file, args.context)  # a bad line fails before any scoring
    scorer = None
    if args.score_server:
        from amygdala.teach.client import Server
        from amygdala.teach.score import served_text_scores
        from amygdala.teach.tokens import Encoder

        server = Server(args.score_server)
        server.check_concepts(thresholds.concepts, "--min/--max")
        encoder = Encoder.load(args.tokenizer or Path(server.model()))
        scorer = lambda texts: served_text_scores(server, encoder, texts, thresholds.concepts)  # noqa: E731
    elif args.score_readout:
        from amygdala.teach.score import local_text_scores

        scorer = lambda texts: local_text_scores(args.score_readout, args.model, texts, thresholds.concepts)  # noqa: E731
    samples, counts = convert.notes_to_samples(notes, thresholds, scorer, source=Path(args.file).name)
    print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()), file=sys.stderr)
    if counts["unscored"] and scorer is None:
        print(f"{counts['unscored']} note(s) lack a thresholded score: --score-server or --score-readout scores them",
              file=sys.stderr)
    if not samples:
        raise AmygdalaError(f"{args.file}: no note passes the thresholds; nothing written")
    _write(args.out, samples, "SFT samples")
    return 0


def _add_pairs(sub) -> None:
    p = sub.add_parser("pairs", help="training samples from chat transcripts or scored notes (docs/teaching.md)")
    psub = p.add_subparsers(dest="pairs_command", required=True)
    t = psub.add_parser("transcripts", help="OpenAI-style {\"messages\": [...]} JSONL -> samples; regenerations and "
                                            "#correction turns -> chosen/rejected")
    t.add_argument("file", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=cmd_pairs)
    n = psub.add_parser("notes", help="notes with scores or 'calm: 0.8' tag lines -> SFT samples above thresholds")
    n.add_argument("file", type=Path)
    n.add_argument("--out", type=Path, required=True)
    n.add_argument("--min", action="append", default=[], metavar="CONCEPT=X", help="keep notes scoring at least X")
    n.add_argument("--max", action="append", default=[], metavar="CONCEPT=X", help="keep notes scoring at most X")
    n.add_argument("--context", default="Write a short note about your day.",
                   help="the context of notes without their own (default: %(default)r)")
    n.add_argument("--score-server", default=None, metavar="URL",
                   help="score notes missing a thresholded concept with the served readout (after the note's last token)")
    n.add_argument("--score-readout", type=Path, default=None, metavar="DIR",
                   help="score them with a local readout instead (mean over the note's tokens)")
    n.add_argument("--model", default="default", help="the local readout's model (default: SmolLM2-135M-Instruct)")
    n.add_argument("--tokenizer", type=Path, default=None, help="with --score-server: the served model's folder")
    n.set_defaults(func=cmd_pairs)


# --------------------------------------------------------------------------- teach
def cmd_teach(args: argparse.Namespace) -> int:
    from amygdala.teach.runs import encode_all, take_snapshot
    from amygdala.teach.samples import read_numbered
    from amygdala.teach.teach import teach

    numbered = read_numbered(args.data)  # every line checked: nothing is submitted from a bad file
    server, encoder = _connect(args)
    encoded = encode_all(encoder, [s for _, s in numbered], args.objective, [f"{args.data}:{n}" for n, _ in numbered])
    snapshot = take_snapshot(server)
    report = teach(server, encoded, objective=args.objective, learning_rate=args.learning_rate, steps=args.steps,
                   concepts=args.concept, eval_samples=args.eval_samples, progress=not args.quiet)
    print(report.table())
    _print_undo(server, snapshot)
    return 0


def _add_teach(sub) -> None:
    p = sub.add_parser("teach", help="fine-tune the served model on a sample file, with before/after numbers")
    _server_args(p)
    p.add_argument("--data", type=Path, required=True, help="samples (JSONL, docs/teaching.md)")
    _train_args(p, "sft", 1e-5, 3)
    p.add_argument("--concept", action="append", default=[], help="also report this concept's readout before/after")
    p.add_argument("--eval-samples", type=int, default=8, help="samples the before/after numbers are measured on")
    p.set_defaults(func=cmd_teach)


# --------------------------------------------------------------------------- dream
def cmd_dream(args: argparse.Namespace) -> int:
    from amygdala.teach.dream import DreamConfig, dream, train_body
    from amygdala.teach.runs import read_prompts, run_jobs, take_snapshot

    toward, away = parse_assignments(args.toward, "--toward", signed=False), parse_assignments(args.away, "--away", signed=False)
    if not toward and not away:
        raise AmygdalaError("dream: give --toward and/or --away, e.g. --toward calm=1 --away anxious=1")
    try:
        temps = tuple(float(t) for t in args.temperatures.split(","))
    except ValueError:
        raise AmygdalaError(f"--temperatures {args.temperatures!r}: expected numbers, e.g. 0.7,1.0,1.3") from None
    if not temps or any(not 0 < t <= 5 for t in temps) or args.samples < 1:
        raise AmygdalaError("--temperatures must be in (0, 5] and --samples at least 1")
    prompts = read_prompts(args.prompts)
    server, encoder = _connect(args)
    cfg = DreamConfig(toward, away, args.samples, temps, args.max_tokens, args.min_gap, args.one_way, seed=args.seed)
    result = dream(server, encoder, prompts, cfg, progress=not args.quiet)
    spread = sorted(result.spread)
    print(f"{result.prompts} prompts: {len(result.triplets)} triplets, {result.below_gap} prompt(s) under the gap "
          f"{cfg.min_gap:g}; best - worst score median {spread[len(spread) // 2] if spread else float('nan'):.3f}")
    _write(args.out, result.samples(encoder.decode), "triplets")
    if args.submit and result.triplets:
        snapshot = take_snapshot(server)
        jobs = run_jobs(server, train_body(encoder, result, args.objective),
                        {"objective": args.objective, "learning_rate": args.learning_rate, "steps": args.steps},
                        progress=not args.quiet)
        print("loss " + ", ".join(f"{j.losses[0]:.4g} -> {j.losses[-1]:.4g}" for j in jobs if j.losses))
        _print_undo(server, snapshot)
    return 0


def _add_dream(sub) -> None:
    p = sub.add_parser("dream", help="on-policy triplets scored by the readout over a temperature sweep; optionally train")
    _server_args(p)
    p.add_argument("--prompts", type=Path, required=True, help="one prompt per line (text, or a JSON list of messages)")
    p.add_argument("--toward", action="append", default=[], metavar="CONCEPT=W", help="prefer samples high in it")
    p.add_argument("--away", action="append", default=[], metavar="CONCEPT=W", help="prefer samples low in it")
    p.add_argument("--samples", type=int, default=4, help="samples per temperature (default 4)")
    p.add_argument("--temperatures", default="0.7,1.0,1.3")
    _generation_args(p, "triplets")
    p.add_argument("--min-gap", type=float, default=0.5, help="least best - worst score for a triplet (default 0.5)")
    p.add_argument("--one-way", action="store_true",
                   help="only the toward triplet, on the plain prompt (trains an unconditional habit; see docs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--submit", action="store_true", help="train on the triplets")
    _train_args(p, "orpo", 1e-5, 3)
    p.set_defaults(func=cmd_dream)


# --------------------------------------------------------------------------- distill
def cmd_distill(args: argparse.Namespace) -> int:
    from amygdala.teach.distill import DistillConfig, distill, neutral_texts
    from amygdala.teach.runs import read_prompts, take_snapshot

    steer = parse_assignments(args.steer, "--steer")
    if not steer:
        raise AmygdalaError("distill: give --steer CONCEPT=STRENGTH, e.g. --steer calm=6")
    if not 0 < args.heldout < 1:
        raise AmygdalaError(f"--heldout {args.heldout}: a fraction in (0, 1)")
    prompts = read_prompts(args.prompts) if args.prompts else None  # None: the shipped varied set
    neutral = neutral_texts(args.neutral, args.neutral_count)
    server, encoder = _connect(args)
    snapshot = take_snapshot(server) if not args.no_train else None
    cfg = DistillConfig(steer, args.max_tokens, args.heldout, args.objective, args.learning_rate, args.steps,
                        submit=not args.no_train)
    report = distill(server, encoder, prompts, cfg, neutral=neutral, progress=not args.quiet)
    _write(args.out, report.samples, "pairs")
    print(report.table())
    if snapshot:
        _print_undo(server, snapshot)
    return 0


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="train the unsteered model toward what a steering makes it say; report the gap closed")
    _server_args(p)
    p.add_argument("--steer", action="append", default=[], metavar="CONCEPT=STRENGTH", help="the steering to distil")
    p.add_argument("--prompts", type=Path, default=None,
                   help="one prompt per line; the last --heldout of them are held out (default: the shipped "
                        "varied set of 73 prompts in 7 genres, --heldout of each genre held out)")
    p.add_argument("--heldout", type=float, default=0.25, help="fraction of prompts held out (default 0.25)")
    p.add_argument("--neutral", type=Path, default=None,
                   help="neutral texts for perplexity, one per line (default: the bundled corpus's)")
    p.add_argument("--neutral-count", type=int, default=16, help="how many bundled neutral texts (default 16)")
    _generation_args(p, "pairs")
    p.add_argument("--no-train", action="store_true", help="only generate the pairs and the before numbers")
    _train_args(p, "orpo", 1e-5, 20)
    p.set_defaults(func=cmd_distill)


# --------------------------------------------------------------------------- rollback
def cmd_rollback(args: argparse.Namespace) -> int:
    from amygdala.teach.client import Server

    r = Server(args.server, _api_key(args)).rollback(args.snapshot)
    print(f"restored {r['snapshot']}: {r['tensors_restored']} of {r['tensors']} tensors changed back (served now; "
          f"prefix cache reset: {r['prefix_cache_reset']}); the next sync writes them to the folder")
    return 0


def _add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="undo a teach/dream/distill run: restore its snapshot in the served weights")
    p.add_argument("--server", required=True)
    _key_args(p)
    p.add_argument("--snapshot", required=True, help="the id the run printed (snap-...)")
    p.set_defaults(func=cmd_rollback)


def add_parsers(sub) -> None:
    for add in (_add_pairs, _add_teach, _add_dream, _add_distill, _add_rollback):
        add(sub)
