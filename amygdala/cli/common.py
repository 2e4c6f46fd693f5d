"""Flags and helpers more than one job family's parser shares."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from amygdala import AmygdalaError

log = logging.getLogger("amygdala")


def _corpus_arg(p: argparse.ArgumentParser, pairs: bool = False) -> None:
    p.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the corpus shipped with amygdala)")
    p.add_argument("--direct-dir", type=Path, default=None, help="extra folder of direct 'I feel X.' descriptions")
    p.add_argument("--no-direct", action="store_true", help="ignore the corpus's own direct/ folder")
    if pairs:  # build only: the reports re-read a corpus folder's stories
        p.add_argument("--pairs", type=Path, default=None, metavar="FILE.jsonl",
                       help='your own contrastive pairs instead of a corpus: one {"positive": ..., "negative": ...} per '
                            'line, optional "concept" (default: the file name)')


def _load_corpus(args: argparse.Namespace):
    """--corpus (default: the bundled one unless only --direct-dir is given), --direct-dir, --no-direct."""
    from amygdala.corpus import bundled_corpus, load_corpus, read_pairs_jsonl

    if getattr(args, "pairs", None) is not None:
        if args.corpus is not None or args.direct_dir is not None:
            raise AmygdalaError("--pairs is a corpus of its own; drop --corpus / --direct-dir, or drop --pairs")
        return read_pairs_jsonl(args.pairs)
    return load_corpus(
        args.corpus or (bundled_corpus() if args.direct_dir is None else None),
        direct_dir=args.direct_dir,
        include_direct=not args.no_direct,
    )


def _readout_arg(p: argparse.ArgumentParser, help: str = "readout folder (from amygdala build)") -> None:
    """--readout, required: the jobs that read, report on or export a built readout."""
    p.add_argument("--readout", type=Path, required=True, help=help)


MODEL_HELP = ("model folder, .gguf file, Hugging Face repo id from the local cache (org/name; never downloaded), "
              "or 'default' (SmolLM2-135M-Instruct)")


def _model_arg(p: argparse.ArgumentParser, dtype_flags: tuple[str, ...] = ("--dtype", "--model-dtype")) -> None:
    """--model, --device and the model's dtype (``build`` keeps --dtype for its stored vectors)."""
    from amygdala.models.resolve import MODEL_DTYPES

    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ..., or auto (device_map=auto: a model bigger than one device spread over "
                        "all of them); default: cuda when available")
    p.add_argument(*dtype_flags, dest="model_dtype", default=None, choices=MODEL_DTYPES,
                   help="dtype the model's weights load in (default: float32 on CPU, bfloat16 on GPU; auto: the checkpoint's)")


#: The flag of each library parameter whose flag is not ``--`` + its name with dashes.
FLAGS = {"method_params": "--method-param", "fmt": "--format", "positions": "--steer-positions",
         "from_token": "--steer-from"}


def flag_message(error: AmygdalaError) -> str:
    """``error``'s message with the library parameter it names (``layers``) said as the flag
    that fills it (``--layers``): the library speaks to Python callers, the CLI to its users."""
    text = str(error)
    params = error.param if isinstance(error.param, tuple) else (error.param,) if error.param else ()
    head, sep, tail = text.partition(": ")
    for param in params:
        head = re.sub(rf"\b{re.escape(param)}\b", FLAGS.get(param, "--" + param.replace("_", "-")), head, count=1)
    return head + sep + tail


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AmygdalaError(f"{flag} {text!r}: expected layer indices, e.g. 14,19") from None


def _placement_args(p: argparse.ArgumentParser) -> None:
    """``--steer-positions`` / ``--steer-from``: where every ``--steer`` term is added (the
    library checks the values, so the CLI and the API keep one rule set)."""
    p.add_argument("--steer-positions", default="all", metavar="all|generated|prompt",
                   help="where --steer is added: every position (default), only generated tokens' positions "
                        "(the prompt is read unsteered), or only the prompt's")
    p.add_argument("--steer-from", type=int, default=None, metavar="N",
                   help="add --steer only at positions >= N of the whole sequence (prompt included)")
