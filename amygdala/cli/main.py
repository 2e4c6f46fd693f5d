"""``amygdala <job>``: one subcommand per job, each a thin layer over a library function.

This module only dispatches: each job family's parser and handler live side by side in their own
module (``build``, ``quality``, ``eval``, ``read``, ``vectors``, ``corpus``, ``checkpoint``,
``serve``, ``teach``), over the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from amygdala import AmygdalaError, __version__


def build_parser() -> argparse.ArgumentParser:
    from amygdala.cli import build, checkpoint, corpus, diff, eval, quality, read, serve, teach, vectors

    parser = argparse.ArgumentParser(prog="amygdala", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"amygdala {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (build._add_build, quality.add_parsers, eval.add_parsers, read.add_parsers, vectors.add_parsers, diff.add_parsers,
                corpus.add_parsers, checkpoint.add_parsers, serve.add_parsers, teach.add_parsers, build._add_demo):
        add(sub)  # the order of `amygdala --help`
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
        from amygdala.cli.common import flag_message

        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
