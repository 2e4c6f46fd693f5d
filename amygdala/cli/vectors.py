"""``amygdala export`` / ``import``: concept vectors out to and in from other steering tools."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from amygdala.cli.common import _int_list, _model_arg, _readout_arg

log = logging.getLogger("amygdala")


# --------------------------------------------------------------------------- export / import
def _parse_concepts(items: list[str]) -> dict[str, float]:
    """``--concept calm`` (weight 1) or ``--concept anxious=-0.5``; the rules of :func:`amygdala.fields.parse_assignments`."""
    from amygdala.fields import parse_assignments
    from amygdala.interop import InteropError

    out = parse_assignments(items, "--concept", bare=1.0, example="calm or anxious=-0.5")
    if not out:
        raise InteropError("--concept: name at least one concept of the readout, e.g. --concept calm")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    """A readout's concept (or mix) as a llama.cpp GGUF, a repeng GGUF or a steering-vectors file."""
    from amygdala.interop import check_format, from_readout, write_vectors
    from amygdala.readout import Readout

    fmt = check_format(args.format)
    weights = _parse_concepts(args.concept)
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
    """The new concept's neutral-text statistics, so it reads as z-scores like the others; every
    check that needs no model (its shape, the corpus) fails before the model loads."""
    from amygdala.corpus import load_corpus
    from amygdala.interop import check_fits, fill_statistics
    from amygdala.pipeline import concept_statistics, matching_model, readout_corpus_root

    info = matching_model(readout, args.model)
    check_fits(vectors, info.hidden_size, info.num_layers, info.name, str(args.source))
    root = readout_corpus_root(readout, args.corpus)
    corpus = load_corpus(root)
    print(f"measuring {args.name}'s neutral-text statistics on {len(corpus.neutral_texts())} texts of {root} "
          f"with {info.name}", file=sys.stderr)
    mean, std = concept_statistics(readout, args.name, corpus, str(info.path), args.device, progress=not args.quiet,
                                   dtype=args.model_dtype)
    fill_statistics(readout, args.name, mean, std)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a concept (or a mix) as a llama.cpp control vector, repeng or steering-vectors file")
    _readout_arg(p)
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


def add_parsers(sub) -> None:
    _add_export(sub)
    _add_import(sub)
