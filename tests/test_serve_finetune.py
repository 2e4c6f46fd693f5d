"""Online training beside vLLM: the training routes on a real CPU vLLM server.

``-m vllm``: vLLM's OpenAI server starts on a tiny model folder with ``AMYGDALA_API_KEY`` set,
is trained through ``POST /train`` while it serves, and restarts from the folder after ``POST
/checkpoint``. The worker without vLLM is tests/test_finetune_worker.py, the routes and settings
without it tests/test_serve_finetune_routes.py.
"""

from __future__ import annotations

import random
import time

import pytest
from transformers import AutoConfig

from helpers import serve as sh
from helpers.training import CONTINUATION, request
from helpers.training import wait_until as _wait
from amygdala.finetune.state import STATE_FILE

vllm = pytest.mark.vllm
KEY = "test-key-7"


# --------------------------------------------------------------------------- on a vLLM server
def _env(**extra: str) -> dict[str, str]:
    return sh.server_env(None, AMYGDALA_API_KEY=KEY, VLLM_PLUGINS="amygdala", AMYGDALA_SYNC_DELAY="3600",
                         AMYGDALA_TRAIN_THREADS="1", **extra)


ARGS = ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--block-size", "32"]


def call(server: sh.Server, method: str, path: str, body: dict | None = None, key: str | None = KEY, timeout: float = 120):
    """(status, JSON) of a request to the server's root (training routes are not under /v1)."""
    return sh.call(server.port, method, path, body, key, timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-train")
    model = sh.make_tiny_model(root / "model")
    rng = random.Random(0)
    context = [rng.randrange(10, 130) for _ in range(80)]  # > 2 KV blocks of 32: the prefix cache holds them
    return root, model, context


@pytest.fixture(scope="module")
def server(files):
    pytest.importorskip("vllm")
    root, model, _ = files
    s = sh.start_server(model, root / "server.log", env=_env(), args=ARGS, timeout=420)
    try:
        yield s
    finally:
        s.stop()


def complete(server: sh.Server, files, prompt: list[int], n: int = len(CONTINUATION)) -> tuple[list[int], int]:
    """Greedy completion of token IDs: (generated IDs, prompt tokens served from the prefix cache)."""
    code, r = server.post("/completions", {"model": str(files[1]), "prompt": prompt, "max_tokens": n, "temperature": 0,
                                           "return_token_ids": True})
    assert code == 200, r
    details = r["usage"].get("prompt_tokens_details") or {}
    return r["choices"][0]["token_ids"], details.get("cached_tokens") or 0


def status(server: sh.Server) -> dict:
    code, body = call(server, "GET", "/train/status")
    assert code == 200, body
    return body


@vllm
def test_training_routes_need_the_key(server):
    for path, method in (("/train", "POST"), ("/train/status", "GET"), ("/checkpoint", "POST")):
        for key in (None, "wrong"):
            code, body = call(server, method, path, request() if method == "POST" else None, key=key)
            assert code == 401 and body["error"]["type"] == "AuthenticationError", (path, key)
    assert status(server)["jobs"] == 0


@vllm
def test_bad_training_input_is_a_400_naming_the_field(server, files):
    vocab = AutoConfig.from_pretrained(files[1]).vocab_size
    cases = [
        ({"samples": [{"context_ids": [2, 10], "continuation_ids": [11, vocab]}]}, "samples[0].continuation_ids[1]"),
        ({"samples": [{"context_ids": [2, 10], "continuation_ids": []}]}, "samples[0].continuation_ids"),
        ({"samples": [{"context_ids": "2 10", "continuation_ids": [11]}]}, "samples[0].context_ids"),
        ({"samples": [{"context_ids": [2, 10.0], "continuation_ids": [11]}]}, "samples[0].context_ids[1]"),
        ({"samples": [{"context_ids": [10] * 1020, "continuation_ids": [11] * 10}]}, "samples[0].continuation_ids"),
        ({"samples": [{"context_ids": [2], "continuation_ids": [11]}], "config": {"objective": "ppo"}}, "config.objective"),
        ({"samples": [{"context_ids": [2], "continuation_ids": [11]}], "config": {"objective": "dpo"}}, "samples[0].rejected_ids"),
        ({"samples": []}, "samples"),
    ]
    for body, field in cases:
        code, r = call(server, "POST", "/train", body)
        assert code == 400 and r["error"]["param"] == field, (field, r)
        assert r["error"]["message"].startswith(field + ":")
    s = status(server)
    assert s["jobs"] == 0 and s["queue"] == [] and s["current"] is None


@vllm
def test_train_while_serving_then_greedy_completion_is_the_continuation(server, files):
    root, model, context = files
    pid = server.proc.pid
    first, _ = complete(server, files, context)
    again, cached = complete(server, files, context)
    assert first == again and first != CONTINUATION and cached >= 64  # the prefix cache is on
    s0 = status(server)

    rng = random.Random(1)  # a job long enough to serve requests during it, at a learning rate that changes little
    busy = {"samples": [{"context_ids": [rng.randrange(10, 130) for _ in range(120)],
                         "continuation_ids": [rng.randrange(10, 130) for _ in range(8)]} for _ in range(32)],
            "config": {"learning_rate": 1e-7, "steps": 40}}
    code, a = call(server, "POST", "/train", busy)
    assert code == 200 and a["ahead"] == 0
    _wait(lambda: (c := status(server)["current"]) and c["id"] == a["job_id"], 60, "the first job to start", poll=0.1)
    code, b = call(server, "POST", "/train", request(steps=30, context=context))
    assert code == 200 and b["ahead"] == 1
    during = status(server)
    assert during["current"]["id"] == a["job_id"] and [j["id"] for j in during["queue"]] == [b["job_id"]]

    t0 = time.time()
    served, _ = complete(server, files, [2, 20, 21, 22], n=8)  # a concurrent request, served while the job trains
    t1 = time.time()
    after = status(server)
    assert len(served) == 8 and after["current"]["id"] == a["job_id"]
    assert after["current"]["started_at"] < t0

    done = _wait(lambda: len((s := status(server))["finished"]) == 2 and s["state"] == "idle" and s, 300, "both jobs", poll=0.2)
    jobs = {j["id"]: j for j in done["finished"]}
    assert jobs[a["job_id"]]["state"] == jobs[b["job_id"]]["state"] == "done"
    assert jobs[a["job_id"]]["finished_at"] > t1  # the request above was served inside the first job
    assert jobs[a["job_id"]]["prefix_cache_reset"] and jobs[b["job_id"]]["prefix_cache_reset"]
    losses = jobs[b["job_id"]]["losses"]
    assert len(losses) == 30 and losses[-1] < 0.1 * losses[0]
    assert done["steps"] == s0["steps"] + 70 and done["jobs"] == s0["jobs"] + 2

    trained, cached = complete(server, files, context)
    assert trained == CONTINUATION and cached == 0  # no KV from the old weights survived the job
    again, cached = complete(server, files, context)
    assert again == CONTINUATION and cached >= 64
    assert server.proc.poll() is None and server.proc.pid == pid  # no restart


@vllm
def test_a_second_server_on_the_same_folder_is_refused_at_start(server, files):
    root, model, _ = files
    other = sh.start_server(model, root / "second.log", env=_env(), args=ARGS, wait=False)
    try:
        other.proc.wait(300)
    finally:
        other.stop()
    assert other.proc.returncode != 0
    assert "holds this model folder" in (root / "second.log").read_text()


@vllm
def test_checkpoint_then_restart_serves_the_same_and_the_step_count_continues(server, files):
    root, model, context = files
    code, sync = call(server, "POST", "/checkpoint")
    assert code == 200 and sync["tensors_changed"] > 0 and sync["sidecars"] == [STATE_FILE]
    before = status(server)
    assert before["last_sync"]["bytes_written"] == sync["bytes_written"] and not before["sync"]["unsynced_changes"]
    server.stop()

    again = sh.start_server(model, root / "restart.log", env=_env(), args=ARGS, timeout=420)
    try:
        assert complete(again, files, context)[0] == CONTINUATION
        restored = status(again)
        assert (restored["steps"], restored["jobs"]) == (before["steps"], before["jobs"])
        assert restored["optimizer"]["state_bytes"] == before["optimizer"]["state_bytes"] > 0  # moments restored
        code, job = call(again, "POST", "/train", request(steps=2, lr=1e-6, context=context))
        assert code == 200
        s = _wait(lambda: (s := status(again))["finished"] and s, 120, "the job", poll=0.2)
        assert s["finished"][0]["state"] == "done" and s["steps"] == before["steps"] + 2
    finally:
        again.stop()
