"""Online training beside vLLM: the training worker (queue, automatic sync, ZeroMQ, a process on
shared-memory views of the holder's tensors) and the routes on a real CPU vLLM server.

The first half runs without vLLM (a tiny model, seconds). The second half (``-m vllm``) starts
vLLM's OpenAI server on a tiny model folder with ``AMYGDALA_API_KEY`` set, trains it through
``POST /train`` while it serves, and restarts it from the folder after ``POST /checkpoint``.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
import zmq
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers import serve as sh
from helpers import tiny
from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.fields import FieldError
from amygdala.finetune.state import STATE_FILE
from amygdala.finetune.trainer import Trainer
from amygdala.finetune.service import TrainingService, WorkerError
from amygdala.finetune.worker import WorkerSpec, spawn

vllm = pytest.mark.vllm
KEY = "test-key-7"
CONTEXT, CONTINUATION = [2, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45]


def request(steps: int = 15, lr: float = 1e-2, context=CONTEXT, continuation=CONTINUATION) -> dict:
    return {"samples": [{"context_ids": list(context), "continuation_ids": list(continuation)}],
            "config": {"objective": "sft", "learning_rate": lr, "steps": steps}}


def _serve(folder):
    """What vLLM holds: merged tensors (its layout), and a model on views of them."""
    config = AutoConfig.from_pretrained(folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    return config, served, shared_weights.view_model(config, served)


def _greedy(model, context=CONTEXT, n=len(CONTINUATION)) -> list[int]:
    ids = torch.tensor([context])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(context):].tolist()


def _wait(condition, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def service(tmp_path, one_thread):
    """A TrainingService on a tiny model, its job thread running; yields (service, model, served, resets)."""
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    _, served, model = _serve(folder)
    resets: list[float] = []

    def reset() -> tuple[bool, None]:
        resets.append(time.time())
        return True, None

    svc = TrainingService(Trainer(model, folder, served=served), sync_delay=3600, reset_cache=reset)
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    yield svc, model, served, resets, thread
    stop.set()
    if thread.is_alive():
        thread.join(10)


# --------------------------------------------------------------------------- the service, no vLLM
def test_jobs_run_in_order_queued_ones_are_shown_and_each_resets_the_cache(service):
    svc, model, _, resets, thread = service
    before = _greedy(model)
    a = svc.submit(request(steps=20))
    b = svc.submit(request(steps=10))
    assert (a["state"], a["ahead"], b["ahead"]) == ("queued", 0, 1)
    status = svc.status()
    assert [j["id"] for j in status["queue"]] == [a["job_id"], b["job_id"]] and status["current"] is None
    with pytest.raises(FieldError) as bad:
        svc.submit({"samples": [{"context_ids": [2], "continuation_ids": []}]})
    assert bad.value.path == "samples[0].continuation_ids" and len(svc.status()["queue"]) == 2

    thread.start()
    status = _wait(lambda: (s := svc.status())["state"] == "idle" and len(s["finished"]) == 2 and s, 120, "two jobs")
    done = list(reversed(status["finished"]))
    assert [j["id"] for j in done] == [a["job_id"], b["job_id"]]
    assert [(j["state"], j["step"], len(j["losses"]), j["prefix_cache_reset"]) for j in done] == [("done", 20, 20, True), ("done", 10, 10, True)]
    assert done[0]["started_at"] <= done[0]["finished_at"] <= done[1]["started_at"]
    assert len(resets) == 2 and resets[0] >= done[0]["started_at"]
    assert status["steps"] == 30 and status["jobs"] == 2 and status["optimizer"]["state_bytes"] > 0
    assert status["sync"]["unsynced_changes"] and status["last_sync"] is None  # delay 3600 s: not yet
    assert before != CONTINUATION and _greedy(model) == CONTINUATION  # the served weights, in place


def test_sync_runs_a_delay_after_the_last_job_and_a_new_job_restarts_the_delay(service):
    svc, _, served, _, thread = service
    svc.sync_delay = 3.0
    thread.start()
    svc.submit(request(steps=3))
    first = _wait(lambda: (s := svc.status())["finished"] and s["finished"][0], 60, "job 1")
    time.sleep(1.5)
    assert svc.status()["last_sync"] is None
    svc.submit(request(steps=2))  # 1.5 s into the delay: restarts it
    second = _wait(lambda: len((s := svc.status())["finished"]) == 2 and s["finished"][0], 60, "job 2")
    syncs = set()
    deadline = second["finished_at"] + 3.0 + 20
    while time.time() < deadline and not syncs:
        last = svc.status()["last_sync"]
        if last is not None:
            syncs.add(last["at"])
        time.sleep(0.05)
    status = svc.status()
    assert len(syncs) == 1, "exactly one sync, after the second job's delay"
    at = syncs.pop()
    assert at >= second["finished_at"] + 3.0 - 0.05 > first["finished_at"] + 3.0
    assert not status["sync"]["unsynced_changes"] and status["sync"]["due_in_s"] is None
    on_disk = layout.to_served(load_file(svc.trainer.model_dir / "model.safetensors"))
    assert all(torch.equal(on_disk[n], t) for n, t in served.items())


def test_checkpoint_runs_after_the_running_job_and_before_queued_ones(service):
    svc, _, _, _, thread = service
    thread.start()
    long = svc.submit(request(steps=400, lr=1e-4))
    _wait(lambda: (c := svc.status()["current"]) and c["step"] >= 1, 60, "the long job to start")
    queued = svc.submit(request(steps=3))
    results: list[dict] = []
    svc.checkpoint(results.append)
    assert svc.status()["sync"]["requested"] == 1
    _wait(lambda: results, 300, "the sync")
    assert results[0]["ok"] and results[0]["sync"]["steps"] == 400  # after the running job, before the queued one
    assert results[0]["sync"]["tensors_changed"] > 0 and results[0]["sync"]["sidecars"] == [STATE_FILE]
    status = _wait(lambda: len((s := svc.status())["finished"]) == 2 and s, 60, "the queued job")
    assert [j["id"] for j in reversed(status["finished"])] == [long["job_id"], queued["job_id"]]
    assert status["steps"] == 403 and status["sync"]["unsynced_changes"]


def test_a_failed_job_is_reported_and_nothing_is_applied(service):
    svc, _, served, resets, thread = service
    served["model.norm.weight"][0] = float("nan")  # every loss is NaN from the first step
    before = {n: t.clone() for n, t in served.items()}
    thread.start()
    svc.submit(request(steps=5))
    job = _wait(lambda: (s := svc.status())["finished"] and s["finished"][0], 60, "the job")
    assert job["state"] == "failed" and job["step"] == 0 and "steps 1..0 were applied" in job["error"]
    assert resets == [] and not svc.status()["sync"]["unsynced_changes"]
    for name, t in served.items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- the process, no vLLM
def _ask(address: str, message: dict, timeout: float = 120) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(json.dumps(message).encode())
        assert sock.poll(int(timeout * 1000)), f"no answer to {message['op']}"
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def test_worker_process_trains_the_holders_tensors_in_place_over_zeromq(tmp_path, one_thread):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    _, served, mine = _serve(folder)  # this process stands in for vLLM: it holds the weights
    qkv = served["model.layers.1.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    address = f"ipc://{tmp_path / 'w.sock'}"
    proc = spawn(served, WorkerSpec(str(folder), address, threads=1))
    try:
        assert all(t.is_shared() for t in served.values())  # moved in place: our views followed
        reply = _ask(address, {"op": "submit", "request": {"samples": [{"context_ids": [2], "continuation_ids": [1000]}]}})
        assert not reply["ok"] and reply["error"]["field"] == "samples[0].continuation_ids[0]"
        reply = _ask(address, {"op": "submit", "request": request(steps=30)})
        assert reply["ok"] and reply["job"]["ahead"] == 0
        _wait(lambda: _ask(address, {"op": "status"})["status"]["finished"], 120, "the job", poll=0.2)
        assert not torch.equal(qkv, before)  # another process wrote into our tensors
        assert _greedy(mine) == CONTINUATION
        reply = _ask(address, {"op": "checkpoint"})
        assert reply["ok"] and reply["sync"]["steps"] == 30 and reply["sync"]["tensors_changed"] > 0
        on_disk = layout.to_served(load_file(folder / "model.safetensors"))
        assert torch.equal(on_disk["model.layers.1.self_attn.qkv_proj.weight"], qkv)
        with pytest.raises(WorkerError, match=rf"another training worker \(pid {proc.pid}\) holds this model folder"):
            spawn(served, WorkerSpec(str(folder), f"ipc://{tmp_path / 'w2.sock'}", threads=1))
    finally:
        proc.terminate()
        proc.wait(30)


# --------------------------------------------------------------------------- routes and settings, no vLLM
def test_routes_are_off_without_a_key_and_need_it_when_set(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve import config, finetune_routes

    monkeypatch.delenv(config.API_KEY_ENV, raising=False)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    client = TestClient(app)
    assert client.post("/train", json=request()).status_code == 404
    assert client.get("/train/status").status_code == 404
    assert client.post("/checkpoint").status_code == 404

    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        for method, path in (("post", "/train"), ("get", "/train/status"), ("post", "/checkpoint")):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/train", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_settings_come_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    from amygdala.serve import config, finetune_engine

    for var in (config.OPTIMIZER_ENV, config.SYNC_DELAY_ENV, config.THREADS_ENV):
        monkeypatch.delenv(var, raising=False)
    assert finetune_engine.settings() == ("apollo-mini", 600.0, 0)
    monkeypatch.setenv(config.SYNC_DELAY_ENV, "30")
    monkeypatch.setenv(config.OPTIMIZER_ENV, "apollo")
    monkeypatch.setenv(config.THREADS_ENV, "2")
    assert finetune_engine.settings() == ("apollo", 30.0, 2)
    for var, value in ((config.SYNC_DELAY_ENV, "soon"), (config.SYNC_DELAY_ENV, "-1"), (config.OPTIMIZER_ENV, "sgd"),
                       (config.THREADS_ENV, "0")):
        monkeypatch.setenv(var, value)
        with pytest.raises(finetune_engine.TrainingSetupError, match=rf"^{var}={value!r}: "):
            finetune_engine.settings()
        monkeypatch.delenv(var)


@pytest.mark.vllm  # imports vLLM
def test_amygdala_serve_trains_without_a_readout_when_the_key_is_set(tmp_path, monkeypatch, capsys):
    import argparse

    pytest.importorskip("vllm")
    from amygdala import AmygdalaError
    from amygdala.cli import serve as cli
    from amygdala.serve import config

    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    for var in (config.API_KEY_ENV, "AMYGDALA_READOUT", "VLLM_READOUT_VECTORS"):
        monkeypatch.delenv(var, raising=False)
    args = parser.parse_args(["serve", "--model", str(folder), "--dry-run"])
    with pytest.raises(AmygdalaError, match=f"nothing to serve: give --readout, or set {config.API_KEY_ENV}"):
        args.func(args)
    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("VLLM_PLUGINS=amygdala ") and "--host 127.0.0.1" in out and "--enforce-eager" in out
    assert "AMYGDALA_READOUT" not in out and KEY not in out


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
