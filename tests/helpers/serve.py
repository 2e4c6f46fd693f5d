"""Helpers for the vLLM plugin tests: a tiny Llama that vLLM's CPU build accepts, its readout file,
and a vLLM OpenAI server run as a subprocess (the way users run it).

vLLM's CPU attention refuses head_dim 16, so the model has hidden 128 and 2 heads of 64. The
tokenizer is tests/helpers/tiny.py's word-level one (trained in-process), so prompts are space-separated
words from ``tiny.COMMON`` and every word is one token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tiny
from amygdala.readout import Readout

CONCEPTS = ["calm", "angry", "joyful", "afraid", "curious"]
LAYERS = [1, 2]
NUM_LAYERS = 4
HIDDEN = 128


def make_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """A random fp32 Llama (hidden 128, 4 layers, head_dim 64) with tiny.py's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = tiny.make_tokenizer()
    config = tiny.make_config("llama", len(tok), hidden=HIDDEN, layers=NUM_LAYERS, heads=2)
    config.max_position_embeddings = 1024
    # Peaked logits keep greedy decoding far from near-ties between vLLM and transformers.
    config.initializer_range = 0.2
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_readout(path: Path, *, hidden: int = HIDDEN, seed: int = 1, stats: bool = True, tracks: bool = False) -> Path:
    """Random unit concept vectors at LAYERS, with neutral-text statistics for z-scores.

    ``tracks``: also what a build since issue 23 writes: emotional-text statistics (the default
    set) and the ``emotionality`` and ``valence`` tracks with their neutral-text statistics. The
    values are random: these files test how scores travel, not what they mean."""
    g = torch.Generator().manual_seed(seed)
    vectors = {l: torch.nn.functional.normalize(torch.randn(len(CONCEPTS), hidden, generator=g), dim=1) for l in LAYERS}
    mean = {l: torch.randn(len(CONCEPTS), generator=g) for l in LAYERS} if stats else None
    std = {l: torch.rand(len(CONCEPTS), generator=g) + 0.5 for l in LAYERS} if stats else None
    meta = {"model": {"name": "tiny-llama", "num_layers": NUM_LAYERS}, "method": "random"}
    extra = {}
    if tracks:
        meta.update(construction="mean_removed", statistics={"available": ["neutral", "emotional"], "default": "emotional"})
        extra = dict(
            emotional_mean={l: torch.randn(len(CONCEPTS), generator=g) + 1.0 for l in LAYERS},
            emotional_std={l: torch.rand(len(CONCEPTS), generator=g) + 0.8 for l in LAYERS},
            track_names=["emotionality", "valence"],
            track_vectors={l: torch.nn.functional.normalize(torch.randn(2, hidden, generator=g), dim=1) for l in LAYERS},
            track_mean={l: torch.randn(2, generator=g) for l in LAYERS},
            track_std={l: torch.rand(2, generator=g) + 0.5 for l in LAYERS},
        )
    Readout(list(CONCEPTS), list(LAYERS), vectors, mean, std, meta=meta, **extra).save(path)
    return path


def make_files(root: Path, *, tracks: bool = False) -> tuple[Path, Path, Path, Path]:
    """(root, tiny model, its readout, a readout of the wrong hidden size): what the serve tests
    start servers on, built once per module; ``tracks`` as in :func:`make_readout`."""
    return (root, make_tiny_model(root / "model"), make_readout(root / "readout", tracks=tracks),
            make_readout(root / "bad-readout", hidden=64))


def prompt_words(n: int, seed: int = 0) -> str:
    """``n`` words of the tiny vocabulary (n tokens, plus the BOS the tokenizer adds)."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(tiny.COMMON[:120]) for _ in range(n))


#: vLLM's one-worker layout: the worker runs inside the engine's process instead of a process of
#: its own. A start here is mostly processes importing vLLM (about 15 s each on 2 cores), so a
#: server starts in about 34 s instead of 50. For tests whose subject is the hook sites, the
#: request fields or the page, not the process layout: tests/test_serve.py and every training
#: test keep the layout ``vllm serve`` gives users (API server, engine, worker).
ONE_PROCESS_ARGS = ("--distributed-executor-backend", "uni")
ONE_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(readout: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), TOKENIZERS_PARALLELISM="false")
    # Each server makes its own private socket folder: inherited addresses would have two servers
    # bind one socket, and one would read (and drop) the other's scores.
    for name in ("AMYGDALA_READOUT", "VLLM_READOUT_VECTORS", "AMYGDALA_RUNTIME_DIR", "AMYGDALA_SERVE_CHANNEL",
                 "AMYGDALA_TRAIN_CONTROL", "AMYGDALA_TRAIN_EVENTS"):
        env.pop(name, None)
    if readout is not None:
        env["AMYGDALA_READOUT"] = str(readout)
        env["VLLM_PLUGINS"] = "amygdala"
    env.update(extra)
    return env


@dataclass
class Server:
    """A running OpenAI-compatible vLLM server; ``url`` ends in /v1."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stream(self, path: str, body: dict, timeout: float = 120) -> list[dict]:
        """POST with stream=true; the parsed JSON of every SSE data line before [DONE]."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        chunks = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        return chunks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def call(port: int, method: str, path: str, body=None, key: str | None = None, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON) of a request to the server's root (the training routes are not under /v1);
    a non-JSON error body comes back as ``{"raw": its start}``."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw[:200].decode(errors="replace")}


def start_server(
    model: Path,
    log: Path,
    *,
    readout: Path | None = None,
    args: list[str] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 240,
    one_process: bool = False,
) -> Server:
    """Start vLLM's OpenAI-compatible server (what ``vllm serve`` runs) as a user would;
    ``one_process``: in the one-worker layout of :data:`ONE_PROCESS_ARGS`."""
    port = free_port()
    env = dict(env or server_env(readout))
    if one_process:
        args = [*ONE_PROCESS_ARGS, *args]
        env.update(ONE_PROCESS_ENV)
    cmd = [
        # -P: no working directory on sys.path (a stale amygdala.egg-info in a source checkout
        # would hide the installed entry points).
        sys.executable, "-P", "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--max-num-seqs", "16", *args,
    ]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    if wait:
        wait_ready(server, timeout)
    return server


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.proc.returncode}:\n{server.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"vLLM server not ready after {timeout} s:\n{server.log.read_text()[-4000:]}")
