"""The training worker without vLLM: the job service (queue, automatic sync, checkpoint order,
a failed job) on a tiny model, and the worker process training the holder's shared-memory
tensors in place over ZeroMQ. Split from tests/test_serve_finetune.py (the vLLM half)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
import zmq
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers import tiny
from helpers.training import CONTEXT, CONTINUATION, request
from helpers.training import wait_until as _wait
from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.fields import FieldError
from amygdala.finetune.state import STATE_FILE
from amygdala.finetune.trainer import Trainer
from amygdala.finetune.service import TrainingService, WorkerError
from amygdala.finetune.worker import WorkerSpec, spawn


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
