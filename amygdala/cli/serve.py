"""``amygdala serve`` and ``amygdala view``: parsers and handlers (the vLLM command line: :mod:`amygdala.serve.launch`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.cli.common import MODEL_HELP, _placement_args
from amygdala.serve import launch
from amygdala.serve.config import API_KEY_ENV, DEFAULT_STEER_ENV, READOUT_ENV
from amygdala.serve.launch import BIND_ENV, _need_vllm, vllm_argv


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM: OpenAI API with per-token readout and steering",
        description=launch.__doc__.split("What ``amygdala serve`` does:", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--readout", type=Path, default=None,
                   help="readout folder (readout.safetensors + readout.json); optional when AMYGDALA_API_KEY is set "
                        "(the training routes, docs/finetuning.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote-training", action="store_true",
                   help=f"with {API_KEY_ENV} set, allow a --host other than loopback: the training routes (which change "
                        "the served weights) are then reachable from the network")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="serve the readout even when the model's weight files differ from the ones it was built from")
    p.add_argument("--steer", action="append", default=[], metavar="CONCEPT=STRENGTH",
                   help="server-wide steering of every request without a steer field of its own (a request's "
                        "steer, [] included, replaces it); shown as default_steer in /v1/readout/manifest")
    _placement_args(p)
    p.add_argument("--dry-run", action="store_true", help="check, print the vLLM command line, start nothing")
    p.add_argument("--no-page", action="store_true", help="do not serve the live page at /amygdala/")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_FLAGS", help="passed to vLLM unchanged")
    p.set_defaults(func=run)
    return p


def add_view_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "view",
        help="serve a model and print the address of the live page (chat, per-token readout, steering)",
        description="Start `amygdala serve` with the live page on, wait until it answers, and print the page's "
                    "address. Ctrl-C stops the server. Flags after -- go to vLLM.",
    )
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--readout", type=Path, required=True, help="readout folder (readout.safetensors + readout.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--open", action="store_true", help="also open the page in the default browser")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="serve the readout even when the model's weight files differ from the ones it was built from")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to start (default 600)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_FLAGS", help="passed to vLLM unchanged")
    p.set_defaults(func=view, no_page=False, dry_run=False, allow_remote_training=False)  # view: training stays local
    return p


def run(args: argparse.Namespace) -> int:
    _need_vllm()
    argv, env = vllm_argv(args)
    if args.dry_run:
        readout = f"{READOUT_ENV}={shlex.quote(env[READOUT_ENV])} " if READOUT_ENV in env else ""
        bind = f"{BIND_ENV}={shlex.quote(env[BIND_ENV])} " if env.get(BIND_ENV) and BIND_ENV not in os.environ else ""
        steer = f"{DEFAULT_STEER_ENV}={shlex.quote(env[DEFAULT_STEER_ENV])} " if DEFAULT_STEER_ENV in env else ""
        print(f"{readout}{steer}{bind}VLLM_PLUGINS={env['VLLM_PLUGINS']} {shlex.join(argv)}")
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 0  # not reached


def view(args: argparse.Namespace) -> int:
    """Run the server as a child, print the page's address once it answers, wait for Ctrl-C."""
    import subprocess
    import time
    import urllib.error
    import urllib.request

    _need_vllm()
    argv, env = vllm_argv(args)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{args.port}"
    print(f"starting vLLM with {args.model} (a minute or more on a CPU) ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv, env=env)
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None:
                raise AmygdalaError(f"the server exited with code {proc.returncode} before it answered; its log is above")
            if time.monotonic() > deadline:
                raise AmygdalaError(f"the server did not answer {base}/health within {args.timeout:.0f} s; raise --timeout")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        url = f"{base}/amygdala/"
        print(f"amygdala view: open {url}  (Ctrl-C stops the server)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def add_parsers(sub) -> None:
    add_parser(sub)
    add_view_parser(sub)
