"""Flags and helpers more than one job family's parser shares."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from amygdala import AmygdalaError

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


def _readout_arg(p: argparse.ArgumentParser, help: str = "readout folder (from amygdala build)") -> None:
    """--readout, required: the jobs that read, report on or export a built readout."""
    p.add_argument("--readout", type=Path, required=True, help=help)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


#: The flag of each library parameter whose flag is not ``--`` + its name with dashes.
FLAGS = {"method_params": "--method-param", "fmt": "--format"}


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
