"""A live server on the tiny model with readout and training on, and what its tests ask of it:
shared by tests/test_serve_live.py (limits, soak, fuzz) and tests/test_serve_kill.py (kill -9)."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from amygdala import crash

from . import serve as sh
from .training import wait_until as wait_for

KEY = "live-hardening-key"
ARGS = ["--max-model-len", "256", "--enable-prefix-caching", "--block-size", "32"]
FROZEN = ("embed_tokens", "lm_head")  # the trainer freezes them: never changed by a job


def figures(name: str, **values) -> None:
    print(f"FIGURES {json.dumps({'test': name, **values})}", flush=True)


def env(crash_file: Path) -> dict[str, str]:
    """The server's environment; ``crash_file`` arms crash points at run time (amygdala.crash)."""
    return sh.server_env(None, AMYGDALA_API_KEY=KEY, VLLM_PLUGINS="amygdala", AMYGDALA_SYNC_DELAY="3600",
                         AMYGDALA_TRAIN_THREADS="1", **{crash.FILE_ENV: str(crash_file)})


def start(model: Path, readout: Path, log: Path, crash_file: Path) -> sh.Server:
    return sh.start_server(model, log, readout=readout, env={**env(crash_file), "AMYGDALA_READOUT": str(readout)},
                           args=ARGS, timeout=420)


def fixtures(name: str):
    """The module fixtures ``files`` (root, tiny model folder, readout) and ``live`` ({"server":
    the module's current server, "start_s": its start time}; a test may replace the server)."""

    @pytest.fixture(scope="module")
    def files(tmp_path_factory):
        pytest.importorskip("vllm")
        root = tmp_path_factory.mktemp(name)
        return root, sh.make_tiny_model(root / "model"), sh.make_readout(root / "readout")

    @pytest.fixture(scope="module")
    def live(files):
        root, model, readout = files
        t0 = time.monotonic()
        holder = {"server": start(model, readout, root / "server.log", root / "crash-at"), "start_s": time.monotonic() - t0}
        try:
            yield holder
        finally:
            holder["server"].stop()

    return files, live


def call(port: int, method: str, path: str, body=None, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict]:
    return sh.call(port, method, path, body, key, timeout)


def stream(port: int, body: dict, timeout: float = 120) -> tuple[int, str, list]:
    """(status, text, readout rows) of a streamed completion."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    text, rows = [], []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        text.append(choice.get("text") or "")
                        if "readout" in choice:
                            rows.append(choice["readout"])
            return r.status, "".join(text), rows
    except urllib.error.HTTPError as e:
        return e.code, "", []

def tree(proc) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []

def kill_tree(proc) -> int:
    """SIGKILL every process of the server at once (API server, engine, worker, training worker)."""
    procs = tree(proc)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(30)
    return len(procs)

def status(port: int) -> dict:
    code, body = call(port, "GET", "/train/status")
    assert code == 200, body
    return body

def idle(port: int, timeout: float = 300) -> dict:
    return wait_for(lambda: (s := status(port))["state"] == "idle" and not s["queue"] and s, timeout, "an idle worker", 0.2)

def job(samples: int = 1, steps: int = 3, lr: float = 1e-9, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"samples": [{"context_ids": [rng.randrange(10, 130) for _ in range(12)],
                         "continuation_ids": [rng.randrange(10, 130) for _ in range(6)]} for _ in range(samples)],
            "config": {"learning_rate": lr, "steps": steps}}
