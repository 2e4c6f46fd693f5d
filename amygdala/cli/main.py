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


def _corpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the corpus shipped with amygdala)")
    p.add_argument("--direct-dir", type=Path, default=None, help="extra folder of direct 'I feel X.' descriptions")
    p.add_argument("--no-direct", action="store_true", help="ignore the corpus's own direct/ folder")


def _load_corpus(args: argparse.Namespace):
    """--corpus (default: the bundled one unless only --direct-dir is given), --direct-dir, --no-direct."""
    from amygdala.corpus import bundled_corpus, load_corpus

    return load_corpus(
        args.corpus or (bundled_corpus() if args.direct_dir is None else None),
        direct_dir=args.direct_dir,
        include_direct=not args.no_direct,
    )


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
def _method_params(args: argparse.Namespace) -> dict[str, str | int]:
    """--method-param NAME=VALUE items and --subspace-eigen-k (train() checks names and types)."""
    params: dict[str, str | int] = {}
    for item in args.method_param:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise AmygdalaError(f"--method-param {item!r}: expected NAME=VALUE, e.g. C=0.1")
        params[name.strip()] = value.strip()
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
        dtype=args.dtype, progress=not args.quiet, construction=args.construction, statistics=args.statistics,
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
        args.readout, corpus, args.out, model=args.model, device=args.device, cfg=config,
        batch_size=args.batch_size, progress=not args.quiet,
    )
    _print_quality(report, (args.out / JSON_NAME, args.out / HTML_NAME))
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from amygdala.quality.evaluate import report_text, run_eval, write
    from amygdala.quality.steering import SteeringConfig

    if args.steer_concepts and args.no_steering:
        raise AmygdalaError("--steer-concepts and --no-steering contradict each other; drop one")
    steering = None if args.no_steering else SteeringConfig(
        concepts=[c.strip() for c in (args.steer_concepts or "").split(",") if c.strip()],
        max_new_tokens=args.max_new_tokens,
    )
    corpus = _load_corpus(args)
    result = run_eval(args.readout, corpus, model=args.model, device=args.device, steering=steering,
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
    from amygdala.readout import DEFAULT_SMOOTH, Readout, score_text, token_rows

    readout = Readout.load(args.readout)
    smooth = DEFAULT_SMOOTH if args.smooth is None else args.smooth
    if smooth < 1:
        raise AmygdalaError(f"--smooth {smooth}: the window is a number of tokens, at least 1")
    if args.against is not None:
        readout.stats_for(args.against)  # a readout without that set fails before the model loads
    info = matching_model(readout, args.model)
    model, tokenizer, _ = load_model(info.path, args.device)
    scored = score_text(model, tokenizer, readout, args.text, against=args.against, smooth=smooth)
    rows = token_rows(scored, readout, args.top)
    if args.html is not None:
        from amygdala.view import conversation_of_text, snapshot_html

        conversation = conversation_of_text(readout, scored, text=args.text, model=info.name)
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(snapshot_html(conversation), encoding="utf-8")
        print(f"wrote {args.html} (open it in a browser; no server needed)", file=sys.stderr)
    if args.json:
        json.dump({"layers": readout.layers, "zscore": readout.has_stats, "against": scored.against,
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


# --------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from amygdala.models import load_model
    from amygdala.pipeline import matching_model
    from amygdala.readout import Readout, Steering, attach, top_concepts

    readout = Readout.load(args.readout)
    steer = _parse_steer(args.steer)
    steering = Steering.from_concepts(readout, steer) if steer else None  # validates names first
    info = matching_model(readout, args.model)
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
             "layers": {str(l): top_concepts(scores[0, first + i, j], readout.concepts, args.top) for j, l in enumerate(readout.layers)}}
            for i, t in enumerate(new.tolist()) if first + i < scores.shape[1]
        ]
        _print_rows(rows, "z-scores" if readout.has_stats else "raw projections")
    return 0


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
    from amygdala.models import load_model
    from amygdala.pipeline import collect_corpus, matching_model
    from amygdala.quality.neutral import emotional_neutral_texts
    from amygdala.quality.run import corpus_for

    corpus = corpus_for(readout, corpus)
    info = matching_model(readout, args.model)
    model, tokenizer, _ = load_model(info.path, args.device)
    acts, _ = collect_corpus(corpus, model, tokenizer, readout.layers, pooling="mean", neutral=False,
                             chat_template=bool(readout.meta.get("chat_template")), progress=not args.quiet)
    rows = emotional_neutral_texts(readout, corpus, acts)
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


# --------------------------------------------------------------------------- checkpoint sync|diagnose
def cmd_checkpoint(args: argparse.Namespace) -> int:
    """sync: replay an interrupted sync, or write --from's tensors as changed blocks; diagnose: report."""
    from amygdala.finetune import checkpoint

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


# --------------------------------------------------------------------------- export / import
def cmd_export(args: argparse.Namespace) -> int:
    """A readout's concept (or mix) as a llama.cpp GGUF, a repeng GGUF or a steering-vectors file."""
    from amygdala.interop import check_format, from_readout, parse_concepts, write_vectors
    from amygdala.readout import Readout

    fmt = check_format(args.format)
    weights = parse_concepts(args.concept)
    layers = _int_list("--layers", args.layers) if args.layers else None
    readout = Readout.load(args.readout)
    vectors = from_readout(readout, weights, args.strength, layers, args.model_hint)
    path = write_vectors(vectors, args.out, fmt)
    norms = ", ".join(f"{l}: {float(vectors.directions[l].norm()):.3g}" for l in vectors.layers)
    print(f"wrote {path} ({fmt}): {' '.join(f'{c}={w:g}' for c, w in weights.items())} x {args.strength:g} at layers "
          f"{vectors.layers}, hidden {vectors.hidden_size}; norm per layer {norms}")
    print({"gguf": f"llama.cpp: llama-cli -m MODEL.gguf --control-vector {path} (as exported; "
                   f"--control-vector-scaled {path}:S multiplies it by S)",
           "repeng": f"repeng: ControlVector.import_gguf({str(path)!r}); model.set_control(vector, coeff=1.0)",
           "steering-vectors": f"steering-vectors: torch.load({str(path)!r}, weights_only=False).apply(model, multiplier=1.0)",
           }[fmt])
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AmygdalaError(f"{flag} {text!r}: expected layer indices, e.g. 14,19") from None


def cmd_import(args: argparse.Namespace) -> int:
    """A GGUF control vector, SteeringVector or repeng ControlVector file as a concept of a readout."""
    from amygdala.interop import add_concept, new_readout, read_vectors, sha256
    from amygdala.models import model_info, resolve_model
    from amygdala.readout import Readout

    vectors, fmt = read_vectors(args.source)
    provenance = {"from": str(args.source.resolve()), "format": fmt, "sha256": sha256(args.source),
                  "model_hint": vectors.model_hint}
    if vectors.origin:
        provenance["origin"] = vectors.origin
    existing = args.into.is_dir() and any((args.into / n).exists() for n in ("readout.json", "readout.safetensors"))
    if existing:
        readout = add_concept(Readout.load(args.into), vectors, args.name, provenance)
        if readout.has_stats:
            _import_statistics(args, readout, vectors)
        how = f"added to {args.into}"
    else:
        info = model_info(resolve_model(args.model))
        readout = new_readout(vectors, args.name, provenance, info.name, info.num_layers, info.hidden_size)
        how = f"new readout {args.into} (no neutral-text statistics: it reads raw projections)"
    readout.save(args.into)
    norms = readout.meta["imported"][args.name]["norms"]
    unused = readout.meta["imported"][args.name]["layers_unused"]
    print(f"imported {args.name} from {args.source} ({fmt}): {how}, layers {readout.layers}, "
          f"norm per layer {', '.join(f'{l}: {n:.3g}' for l, n in norms.items())}"
          + (f"; file layers {unused} not in the readout were left out" if unused else ""))
    return 0


def _import_statistics(args: argparse.Namespace, readout, vectors) -> None:
    """The new (last) concept's neutral-text statistics, so it reads as z-scores like the others."""
    from amygdala.corpus import bundled_corpus, load_corpus
    from amygdala.interop import check_fits, fill_statistics
    from amygdala.models import load_model
    from amygdala.pipeline import matching_model, neutral_statistics

    info = matching_model(readout, args.model)
    check_fits(vectors, info.hidden_size, info.num_layers, info.name, str(args.source))
    built = (readout.meta.get("corpus") or {}).get("path")
    root = args.corpus or (Path(built) if built and Path(built).is_dir() else bundled_corpus())
    corpus = load_corpus(root)  # a bad corpus fails before the model loads
    print(f"measuring {args.name}'s neutral-text statistics on {len(corpus.neutral_texts())} texts of {root} "
          f"with {info.name}", file=sys.stderr)
    model, tokenizer, _ = load_model(info.path, args.device)
    rows = {l: readout.vectors[l][-1:] for l in readout.layers}
    mean, std = neutral_statistics(corpus, model, tokenizer, rows, chat_template=bool(readout.meta.get("chat_template")),
                                   progress=not args.quiet)
    fill_statistics(readout, args.name, {l: mean[l][0] for l in mean}, {l: std[l][0] for l in std})


# --------------------------------------------------------------------------- demo
DEMO_SENTENCE = "My hands were shaking as I opened the envelope, and then I laughed out loud: I got in."


#: The demo's named subset: 12 concepts from 9 clusters, built in about a minute on 2 cores.
DEMO_CONCEPTS = ["terrified", "calm", "furious", "grief_stricken", "joyful", "bored",
                 "grateful", "proud", "lonely", "curious", "amused", "disgusted"]


#: Part of the demo cache's key: bumped when ``build`` starts writing something new into
#: readout.json (2: per-concept valence, arousal and descriptions, which the live page uses), so
#: a readout cached by an older amygdala is built again instead of reused without them; 3: the
#: mean-removed construction, both statistics sets and the emotionality and valence tracks).
DEMO_CACHE_FORMAT = 3


def _demo_readout(args: argparse.Namespace):
    """(readout folder, loaded model or None, how it was obtained): a cached readout when one
    was built from the same corpus texts, model and settings, else a fresh build cached there."""
    import hashlib
    import shutil

    from amygdala.corpus import bundled_corpus, load_corpus
    from amygdala.models import load_model, model_info, resolve_model
    from amygdala.models.resolve import amygdala_home
    from amygdala.pipeline import BuildConfig, build
    from amygdala.readout import Readout

    corpus = load_corpus(bundled_corpus())
    if not args.all:
        corpus = corpus.subset(DEMO_CONCEPTS)
    info = model_info(resolve_model("default"))
    key = hashlib.sha256(
        f"{corpus.sha256()} {info.name} {args.layers} {args.method} {args.pooling} {DEMO_CACHE_FORMAT}".encode()
    ).hexdigest()[:16]
    cached = amygdala_home() / "readouts" / f"demo-{key}"
    what = f"{len(corpus.concepts)} concepts" + ("" if args.all else " (a named subset; --all for every concept)")
    if cached.is_dir() and not args.rebuild:
        try:
            Readout.load(cached)
            shutil.copytree(cached, args.out, dirs_exist_ok=True)
            return None, f"reused the cached readout of {what} ({cached}; --rebuild builds it again)"
        except AmygdalaError:
            pass  # a damaged cache is rebuilt below
    loaded = load_model(info.path, None)
    build(corpus, BuildConfig(layers=args.layers, method=args.method, pooling=args.pooling), args.out, loaded=loaded)
    shutil.copytree(args.out, cached, dirs_exist_ok=True)
    return loaded, f"built {what} from the bundled corpus, cached in {cached}"


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: default model, bundled corpus, build (or reuse), read a sample sentence."""
    from amygdala.models import load_model
    from amygdala.readout import Readout, read_text

    loaded, how = _demo_readout(args)
    print(f"readout written to {args.out}: {how}")
    model, tokenizer, _ = loaded or load_model("default", None)
    rows = read_text(model, tokenizer, Readout.load(args.out), args.text, top=3)
    _print_rows(rows, "z-scores over neutral text")
    return 0


# --------------------------------------------------------------------------- parser
def _add_build(sub) -> None:
    from amygdala.activations import DEFAULT_POOLING
    from amygdala.methods import METHODS

    for name, text in (("build", "build concept vectors from a corpus and write a readout file"),
                       ("train", "old name of `build` (kept as an alias)")):
        p = sub.add_parser(name, help=text)
        _corpus_arg(p)
        _model_arg(p)
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


def _add_quality(sub) -> None:
    p = sub.add_parser("quality", help="quality.json + report.html: clean, fragmented, redundant, wrong-cluster concepts")
    p.add_argument("--readout", type=Path, required=True, help="readout folder (from amygdala build)")
    _corpus_arg(p)
    _model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output folder for quality.json + report.html")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _quality_flags(p)
    p.set_defaults(func=cmd_quality)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out accuracy, valence/arousal geometry and steering efficacy of a readout")
    p.add_argument("--readout", type=Path, required=True, help="readout folder (from amygdala build)")
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


def _add_read(sub) -> None:
    p = sub.add_parser("read", help="per-token concept scores of a text")
    p.add_argument("text")
    p.add_argument("--readout", type=Path, required=True)
    _model_arg(p)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="also write a self-contained page of the text's readout (the live page's snapshot, opens offline)")
    p.add_argument("--against", choices=("neutral", "emotional"), default=None,
                   help="z-score statistics: neutral (more X than plain prose?) or emotional (X rather than "
                        "another feeling?); default: the readout file's")
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="causal moving average over the last N tokens (1: none; default "
                        "amygdala.readout.DEFAULT_SMOOTH, 3)")
    p.set_defaults(func=cmd_read)


def _add_generate(sub) -> None:
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


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a concept (or a mix) as a llama.cpp control vector, repeng or steering-vectors file")
    p.add_argument("--readout", type=Path, required=True, help="readout folder (from amygdala build)")
    p.add_argument("--concept", action="append", default=[], metavar="CONCEPT[=WEIGHT]",
                   help="a concept of the readout, with a weight (default 1); repeat to export one combined vector")
    p.add_argument("--strength", type=float, default=1.0,
                   help="residual-stream units the vector carries (as --steer CONCEPT=STRENGTH; default 1)")
    p.add_argument("--format", required=True, metavar="FORMAT", help="gguf (llama.cpp), repeng or steering-vectors")
    p.add_argument("--out", type=Path, required=True, help="file to write (.gguf for gguf and repeng, .pt for steering-vectors)")
    p.add_argument("--layers", default=None, help="a subset of the readout's layers, e.g. 14 (default: all of them)")
    p.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the readout's model name)")
    p.set_defaults(func=cmd_export)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="a GGUF control vector, repeng or steering-vectors file as a concept of a readout")
    p.add_argument("--from", dest="source", type=Path, required=True, help="the vector file (format found from its bytes)")
    p.add_argument("--name", required=True, help="the new concept's name")
    p.add_argument("--into", type=Path, required=True, help="readout folder to add it to (created when missing)")
    _model_arg(p)
    p.add_argument("--corpus", type=Path, default=None,
                   help="corpus whose neutral texts give the new concept's z-score statistics (default: the readout's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)


def _add_demo(sub) -> None:
    from amygdala.activations import DEFAULT_POOLING

    p = sub.add_parser("demo", help="build on the bundled corpus with the default model and read a sentence")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--layers", default="0.5,0.66")
    p.add_argument("--method", default="diffmean")
    p.add_argument("--pooling", default=DEFAULT_POOLING)
    p.add_argument("--all", action="store_true", help="every concept of the corpus (minutes), not the demo's 12")
    p.add_argument("--rebuild", action="store_true", help="build again even when a cached readout fits")
    p.add_argument("--text", default=DEMO_SENTENCE)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from amygdala.cli import teach_jobs
    from amygdala.serve import cli as serve_cli

    parser = argparse.ArgumentParser(prog="amygdala", description=__doc__)
    parser.add_argument("--version", action="version", version=f"amygdala {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_quality, _add_eval, _add_read, _add_generate, _add_export, _add_import, _add_corpus,
                _add_checkpoint):
        add(sub)
    serve_cli.add_parser(sub)
    serve_cli.add_view_parser(sub)
    teach_jobs.add_parsers(sub)  # pairs, teach, dream, distill, rollback
    _add_demo(sub)
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
