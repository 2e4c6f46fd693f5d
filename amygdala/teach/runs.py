"""What every teach, dream and distill run shares: prompts, a snapshot to undo it, and jobs
submitted to ``/train`` and followed to the end with a progress bar.

Why a snapshot before each run: the run changes the served weights in place; ``POST
/train/rollback`` with the id printed at the start puts them back bit for bit (see
docs/teaching.md). Why all samples are tokenized before the first job: a bad line must stop
the run with nothing submitted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amygdala.teach.client import Server, ServerError
from amygdala.teach.samples import Context, SampleError, TeachSample, file_lines, parse_messages

#: The server refuses bigger jobs (amygdala.finetune.inputs.Limits.max_samples).
MAX_SAMPLES_PER_JOB = 4096


def read_prompts(path: str | Path) -> list[Context]:
    """One prompt per line: plain text, or a JSON list of chat messages. Blank lines are skipped."""
    path = Path(path)
    lines = file_lines(path)
    out: list[Context] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("["):
            try:
                messages = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise SampleError(f"{path}:{n}: starts like JSON messages but is not JSON "
                                  f"({getattr(e, 'msg', 'nested too deeply')}); write plain text or a JSON list of "
                                  "messages") from None
            out.append(parse_messages(messages, f"{path}:{n}"))
        else:
            out.append(line.strip())
    if not out:
        raise SampleError(f"{path}: no prompts; one per line")
    return out


def encode_all(encoder, samples: Sequence[TeachSample], objective: str, where: Sequence[str]) -> list[dict]:
    """Every sample as a ``/train`` sample, or the first one's SampleError (nothing is submitted)."""
    return [encoder.sample(s, objective, w) for s, w in zip(samples, where)]


@dataclass
class JobOutcome:
    job_id: str
    losses: list[float]
    seconds: float


def run_jobs(server: Server, samples: list[dict], config: dict, *, progress: bool = True, poll: float = 0.5) -> list[JobOutcome]:
    """Submit ``samples`` (split into jobs the server accepts) and wait for each, with a tqdm bar
    over all their steps; raises ServerError when a job fails (its message says which steps applied)."""
    from tqdm import tqdm

    chunks = [samples[i:i + MAX_SAMPLES_PER_JOB] for i in range(0, len(samples), MAX_SAMPLES_PER_JOB)]
    steps = int(config.get("steps", 1))
    bar = tqdm(total=steps * len(chunks), desc="training", unit="step", disable=not progress)
    out = []
    try:
        for chunk in chunks:
            job = server.train({"samples": chunk, "config": config})["job_id"]
            done_before = bar.n
            while True:
                status = server.status()
                mine = next((j for j in status["finished"] if j["id"] == job), None)
                current = status.get("current") or {}
                step = mine["step"] if mine else current.get("step", 0) if current.get("id") == job else 0
                losses = (mine or (current if current.get("id") == job else {})).get("losses") or []
                if done_before + step != bar.n:  # redraw on progress only: a poll that saw nothing new draws nothing
                    bar.set_postfix(loss=f"{losses[-1]:.4g}" if losses else "-", refresh=False)
                    bar.update(done_before + step - bar.n)
                if mine is not None:
                    break
                time.sleep(poll)
            if mine["state"] != "done":
                raise ServerError(f"training job {job} failed: {mine.get('error')}")
            out.append(JobOutcome(job, list(mine["losses"]), float(mine.get("seconds") or 0.0)))
    finally:
        bar.close()
    return out


def take_snapshot(server: Server, log=print) -> str:
    snap = server.snapshot()
    log(f"snapshot {snap['snapshot']}: {snap['tensors']} tensors, {snap['bytes'] / 2**20:.1f} MiB in the training "
        f"worker's memory; undo this run with: amygdala rollback --server {server.root} --snapshot {snap['snapshot']}")
    return snap["snapshot"]


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}" if abs(x) < 100 else f"{x:.1f}"
