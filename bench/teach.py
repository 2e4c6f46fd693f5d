"""Distil one positive-valence concept into the default model, on a real `amygdala serve`.

    ./dev bench teach [--concept joyful] [--fraction 0.05] [--learning-rate 5e-5] [--steps 20] [--write]

On a copy of the default model (SmolLM2-135M-Instruct; training writes into the folder it
serves) with the demo readout (``amygdala demo``'s, built or reused from the cache): start
``amygdala serve`` with a training key, then ``amygdala.teach.distill`` with the concept
steered at ``--fraction`` x the mean residual norm at the readout's layers (the scale the
validity bench's steering uses; docs/validity.md), on distill's shipped varied prompts (split
per genre; ``--prompts-per-genre`` keeps the first N of each genre to fit a CPU run). The
table: on the held-out prompts, the unsteered readout of the concept (before, after) against
the steered one, the VADER compound score of the same continuations (an outside judge: a
sentiment lexicon, no model), competence (next-token accuracy, log-likelihood per token) on the
shipped ordinary texts, and perplexity on 16 neutral texts of the bundled corpus. Then
rollback, and a check that the unsteered readout is back to its before value. ``--write``
puts the table into docs/teaching.md.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amygdala.cli.main import main as amygdala  # noqa: E402
from amygdala.models import resolve_model  # noqa: E402
from amygdala.readout import Readout  # noqa: E402
from amygdala.teach.client import Server  # noqa: E402
from amygdala.teach.distill import DistillConfig, distill, neutral_texts  # noqa: E402
from amygdala.teach.judge import shipped_prompts, shipped_split  # noqa: E402
from amygdala.teach.tokens import Encoder  # noqa: E402



def residual_norm(model_dir: Path, layers: list[int], texts: list[str]) -> float:
    """Mean norm of the block output at ``layers`` over the texts' tokens (the steering scale)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    norms = []
    with torch.inference_mode():
        for t in texts:
            out = model(**tok(t, return_tensors="pt"), output_hidden_states=True)
            norms += [float(out.hidden_states[l + 1][0, 1:].norm(dim=-1).mean()) for l in layers]
    return sum(norms) / len(norms)


def start_server(model: Path, readout: Path, key: str, log: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AMYGDALA_API_KEY": key, "AMYGDALA_SYNC_DELAY": "3600", "VLLM_CPU_KVCACHE_SPACE": "2",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "amygdala", "serve", "--model", str(model), "--readout", str(readout),
                             "--port", str(port), "--", "--max-model-len", "2048", "--max-num-seqs", "8"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not start in 900 s")


def prompts(per_genre: int | None, heldout: float) -> tuple[list[str], float]:
    """Train then held-out prompts (the shipped set split per genre, each genre cut to its first ``per_genre``),
    and the fraction that makes distill's split hold out exactly the held-out ones."""
    if per_genre is None:
        train, held = shipped_split(heldout)
    else:
        train, held = _cut(per_genre, heldout)
    return train + held, (len(held) - 0.5) / (len(train) + len(held))


def _cut(per_genre: int, heldout: float) -> tuple[list[str], list[str]]:
    by_genre: dict[str, list[str]] = {}
    for genre, p in shipped_prompts():
        by_genre.setdefault(genre, []).append(p)
    k = max(1, round(heldout * per_genre))
    cut = [ps[:per_genre] for ps in by_genre.values()]
    return [p for ps in cut for p in ps[:-k]], [p for ps in cut for p in ps[-k:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="joyful")
    ap.add_argument("--fraction", type=float, default=0.05, help="steering strength as a fraction of the residual norm")
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--objective", default="orpo")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--prompts-per-genre", type=int, default=None, help="the first N shipped prompts of each genre")
    ap.add_argument("--heldout", type=float, default=0.25)
    ap.add_argument("--write", action="store_true", help="write the table into docs/teaching.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="amygdala-bench-teach-"))
    model = work / "model"
    shutil.copytree(resolve_model("default"), model)
    readout_dir = work / "readout"
    if amygdala(["demo", "--out", str(readout_dir)]) != 0:
        return 1
    readout = Readout.load(readout_dir)
    neutral = neutral_texts(None, 16)
    norm = residual_norm(model, readout.layers, neutral[:8])
    strength = round(args.fraction * norm, 2)
    print(f"residual norm at layers {readout.layers}: {norm:.1f}; steering {args.concept}={strength}", flush=True)

    key = secrets.token_hex(8)
    proc, port = start_server(model, readout_dir, key, work / "server.log")
    try:
        client = Server(f"http://127.0.0.1:{port}", key)
        enc = Encoder.load(model)
        ps, heldout = prompts(args.prompts_per_genre, args.heldout)
        snap = client.snapshot()["snapshot"]
        cfg = DistillConfig({args.concept: strength}, args.max_tokens, heldout, args.objective, args.learning_rate, args.steps)
        t0 = time.perf_counter()
        report = distill(client, enc, ps, cfg, neutral=neutral)
        seconds = time.perf_counter() - t0
        print(report.table())
        c = args.concept
        cb, ca = report.competence_before, report.competence_after
        assert ca is not None
        rows = [
            ("unsteered, before", report.before[c], report.vader_before, f"{cb.accuracy:.2%} / {cb.mean_loglik:.3f}",
             report.ppl_before),
            (f"steered {c}={strength:g}, before", report.steered[c], report.vader_steered, "", None),
            ("unsteered, after", report.after[c], report.vader_after, f"{ca.accuracy:.2%} / {ca.mean_loglik:.3f}",
             report.ppl_after),
        ]
        client.rollback(snap)
        back = distill(client, enc, ps, DistillConfig({c: strength}, args.max_tokens, heldout, submit=False),
                       progress=False).before[c]
        job = report.jobs[0]
        table = "\n".join([
            f"`./dev bench teach` (default model, demo readout at layers {readout.layers}, {c} steered at "
            f"{args.fraction:g} x the residual norm = {strength:g}; {report.pairs} pairs from {report.train_prompts} "
            f"shipped prompts, {report.heldout_prompts} held out, all 7 genres in both; {args.objective}, lr {args.learning_rate:g}, "
            f"{args.steps} steps, APOLLO-Mini; greedy, {args.max_tokens} tokens; CPU, 2 shared cores):",
            "",
            f"| held-out prompts | readout of {c} (z) | VADER compound | competence: accuracy / log-lik per token "
            f"({cb.texts} texts, {cb.tokens} tokens) | neutral perplexity |",
            "|---|---|---|---|---|",
            *[f"| {name} | {r:+.3f} | {v:+.3f} | {comp} | {'' if p is None else f'{p:.3f}'} |" for name, r, v, comp, p in rows],
            "",
            f"Gap closed: {report.gap_closed(c):.0%} of the steered-vs-unsteered readout gap ({report.judges[c].why}). "
            f"Training: loss {job.losses[0]:.4g} -> {job.losses[-1]:.4g} in {job.seconds:.0f} s; the whole distill run "
            f"{seconds:.0f} s. After rollback the unsteered readout is {back:+.3f} "
            f"({'equal to' if back == report.before[c] else 'not equal to'} the before value).",
        ])
        print("\n" + table)
        if args.write:
            doc = ROOT / "docs" / "teaching.md"
            text = doc.read_text()
            marker = "<!-- teach:figures -->"
            doc.write_text(re.sub(re.escape(marker) + r".*", lambda _: marker + "\n" + table + "\n", text, flags=re.S))
            print(f"wrote {doc}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
