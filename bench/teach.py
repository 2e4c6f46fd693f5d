"""Distil one positive-valence concept into the default model, on a real `amygdala serve`.

    ./dev bench teach [--concept joyful] [--fraction 0.05] [--learning-rate 5e-5] [--steps 20] [--write]

On a copy of the default model (SmolLM2-135M-Instruct; training writes into the folder it
serves) with the demo readout (``amygdala demo``'s, built or reused from the cache): start
``amygdala serve`` with a training key, then ``amygdala.teach.distill`` with the concept
steered at ``--fraction`` x the mean residual norm at the readout's layers (the scale the
validity bench's steering uses; docs/validity.md), 16 training prompts and 8 held out. The
table: on the held-out prompts, the unsteered readout of the concept (before, after) against
the steered one, the VADER compound score of the generated text (an outside judge: a
sentiment lexicon, no model), and perplexity on 16 neutral texts of the bundled corpus. Then
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
from amygdala.teach.distill import DistillConfig, distill, neutral_texts, split  # noqa: E402
from amygdala.teach.tokens import Encoder  # noqa: E402

PROMPTS = [
    "Tell me about your morning.", "What did you do last weekend?", "Describe the street where you live.",
    "How do you usually spend a rainy afternoon?", "What is on your desk right now?", "Tell me about a recent walk.",
    "What did you have for lunch today?", "Describe your commute.", "How was the meeting this morning?",
    "What are you working on this week?", "Tell me about the last book you read.", "Describe the weather today.",
    "What did you do after work yesterday?", "Tell me about your kitchen.", "How do you plan your week?",
    "Describe a typical Tuesday.",
    # held out (the last 8)
    "Tell me about your neighbourhood.", "What did you do this afternoon?", "Describe the view from your window.",
    "How was your trip to the shop?", "What happened at work today?", "Tell me about your evening routine.",
    "Describe the last train you took.", "What did you cook yesterday?",
]


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


def texts(client: Server, enc: Encoder, prompts, max_tokens: int, steer=None) -> list[str]:
    return [enc.decode(client.generate(enc.context_ids(p), max_tokens, steer=steer, readout=False)[0].token_ids) for p in prompts]


def vader(xs: list[str]) -> float:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    a = SentimentIntensityAnalyzer()
    return sum(a.polarity_scores(x)["compound"] for x in xs) / len(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="joyful")
    ap.add_argument("--fraction", type=float, default=0.05, help="steering strength as a fraction of the residual norm")
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--objective", default="orpo")
    ap.add_argument("--max-tokens", type=int, default=40)
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
        _, held = split(PROMPTS, 8 / len(PROMPTS))
        plain_before = texts(client, enc, held, args.max_tokens)
        steered = texts(client, enc, held, args.max_tokens, {args.concept: strength})
        snap = client.snapshot()["snapshot"]
        cfg = DistillConfig({args.concept: strength}, args.max_tokens, 8 / len(PROMPTS), args.objective,
                            args.learning_rate, args.steps)
        t0 = time.perf_counter()
        report = distill(client, enc, PROMPTS, cfg, neutral=neutral)
        seconds = time.perf_counter() - t0
        plain_after = texts(client, enc, held, args.max_tokens)
        print(report.table())
        c = args.concept
        rows = [
            ("unsteered, before", report.before[c], vader(plain_before), report.ppl_before),
            (f"steered {c}={strength:g}, before", report.steered[c], vader(steered), None),
            ("unsteered, after", report.after[c], vader(plain_after), report.ppl_after),
        ]
        client.rollback(snap)
        back = distill(client, enc, PROMPTS, DistillConfig({c: strength}, args.max_tokens, 8 / len(PROMPTS), submit=False),
                       progress=False).before[c]
        job = report.jobs[0]
        table = "\n".join([
            f"`./dev bench teach` (default model, demo readout at layers {readout.layers}, {c} steered at "
            f"{args.fraction:g} x the residual norm = {strength:g}; {report.pairs} pairs from {report.train_prompts} "
            f"prompts, {report.heldout_prompts} held out; {args.objective}, lr {args.learning_rate:g}, {args.steps} steps, "
            f"APOLLO-Mini; greedy, {args.max_tokens} tokens; CPU, 2 shared cores):",
            "",
            f"| held-out prompts | readout of {c} (z) | VADER compound | neutral perplexity |",
            "|---|---|---|---|",
            *[f"| {name} | {r:+.3f} | {v:+.3f} | {'' if p is None else f'{p:.3f}'} |" for name, r, v, p in rows],
            "",
            f"Gap closed: {report.gap_closed(c):.0%} of the steered-vs-unsteered readout gap. Training: loss "
            f"{job.losses[0]:.4g} -> {job.losses[-1]:.4g} in {job.seconds:.0f} s; the whole distill run {seconds:.0f} s. "
            f"After rollback the unsteered readout is {back:+.3f} ({'equal to' if back == report.before[c] else 'not equal to'} "
            "the before value).",
        ])
        print("\n" + table)
        print("\nexamples (first held-out prompt):\n  before:  " + plain_before[0] + "\n  steered: " + steered[0] +
              "\n  after:   " + plain_after[0])
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
