"""The training job service (finetune/service.py) and its trainer under bad updates: nothing poisons
the weights, the queue is bounded, a job can be cancelled, a job past the memory estimate is refused.

Formerly part of tests/test_hardening.py (issue 14).
"""

from __future__ import annotations

import threading

import pytest
import torch

from helpers.training import tiny_trainer, wait_until
from amygdala import checkpoint
from amygdala.finetune import protocol, worker
from amygdala.finetune.inputs import JobConfig, Sample
from amygdala.fields import FieldError
from amygdala.finetune.trainer import TrainJobError
from amygdala.finetune.service import QueueFull, TrainingService, UnknownJob


def test_dpo_with_a_huge_beta_skips_the_step_and_leaves_the_weights_as_they_were(tmp_path, one_thread):
    """The issue's reproduction, past the request check (a Python caller can build any JobConfig)."""
    trainer, served = tiny_trainer(tmp_path / "model")
    before = {n: t.clone() for n, t in served.items()}
    sample = Sample((2, 10, 11), (40, 41, 42), (50, 51, 52))
    with pytest.raises(TrainJobError, match=r"step 1: the gradient norm is (inf|nan); steps 1\.\.0 were applied") as e:
        trainer.run([sample], JobConfig(objective="dpo", beta=1e37, learning_rate=1e-2, steps=5))
    assert e.value.steps_applied == 0
    for name, t in served.items():
        assert torch.equal(t, before[name]), name
    assert trainer.run([sample], JobConfig(objective="dpo", beta=0.1, learning_rate=1e-3, steps=2)).steps == 2
    assert all(torch.isfinite(t).all() for t in served.values())


def test_a_non_finite_tensor_is_never_synced_and_status_says_so(tmp_path, one_thread):
    trainer, served = tiny_trainer(tmp_path / "model")
    folder = trainer.model_dir
    svc = TrainingService(trainer, sync_delay=3600)
    served["model.layers.0.mlp.down_proj.weight"][3, 5] += 1.0  # a good change, in the same sync as the bad one
    served["model.layers.1.self_attn.qkv_proj.weight"][0, 0] = float("nan")
    files = lambda: {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != checkpoint.LOCK_FILE}
    before = files()
    results: list[dict] = []
    svc.checkpoint(results.append)
    svc._sync(svc._waiters)  # the job thread's step, run here: one sync, no thread to wait for
    assert not results[0]["ok"] and results[0]["error"]["status"] == 409
    assert "model.layers.1.self_attn.q_proj.weight has 1 non-finite value(s)" in results[0]["error"]["message"]
    assert "keeps its last good state" in svc.status()["sync"]["error"]
    assert files() == before  # nothing written, no journal
    served["model.layers.1.self_attn.qkv_proj.weight"][0, 0] = 0.5
    svc.checkpoint(results.append)
    svc._sync(svc._waiters)
    assert results[1]["ok"] and svc.status()["sync"]["error"] is None


@pytest.fixture()
def service(tmp_path, one_thread):
    trainer, served = tiny_trainer(tmp_path / "model")
    svc = TrainingService(trainer, sync_delay=3600, max_queue=2)
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    yield svc, served, thread
    stop.set()
    if thread.is_alive():
        thread.join(30)


def _job(steps: int, lr: float = 1e-3) -> dict:
    return {"samples": [{"context_ids": [2, 10, 11], "continuation_ids": [40, 41, 42]}],
            "config": {"learning_rate": lr, "steps": steps}}


def test_queue_is_bounded_and_a_full_queue_is_a_429(service):
    svc, _, _ = service
    svc.submit(_job(1))
    svc.submit(_job(1))
    with pytest.raises(QueueFull, match="2 jobs are queued"):
        svc.submit(_job(1))
    reply = worker.handle(svc, protocol.request(protocol.SUBMIT, request=_job(1)), lambda r: None)
    assert not reply["ok"] and reply["error"]["status"] == 429 and len(svc.status()["queue"]) == 2


def test_cancel_drops_a_queued_job_and_stops_a_running_one_after_its_step(service):
    svc, served, thread = service
    before = {n: t.clone() for n, t in served.items()}
    running = svc.submit(_job(10_000, lr=1e-4))
    queued = svc.submit(_job(5))
    assert svc.cancel(queued["job_id"])["state"] == "cancelled"
    thread.start()
    wait_until(lambda: (c := svc.status()["current"]) and c["step"] >= 2, 120, "two steps")
    svc.cancel(running["job_id"])
    status = wait_until(lambda: (s := svc.status())["state"] == "idle" and len(s["finished"]) == 2 and s, 120, "the cancel")
    jobs = {j["id"]: j for j in status["finished"]}
    ran, dropped = jobs[running["job_id"]], jobs[queued["job_id"]]
    assert dropped["state"] == "cancelled" and "nothing was applied" in dropped["error"] and dropped["step"] == 0
    assert ran["state"] == "cancelled" and 2 <= ran["step"] < 10_000 and len(ran["losses"]) == ran["step"]
    assert ran["error"] == f"cancelled: steps 1..{ran['step']} of 10000 were applied"
    assert status["steps"] == ran["step"] and status["sync"]["unsynced_changes"]
    assert any(not torch.equal(t, before[n]) for n, t in served.items())
    with pytest.raises(UnknownJob, match="has already ended") as e:
        svc.cancel(ran["id"])
    assert e.value.finished
    reply = worker.handle(svc, protocol.request(protocol.CANCEL, job_id="job-nope"), lambda r: None)
    assert reply["error"]["status"] == 404 and reply["error"]["field"] == "job_id"


def test_a_job_past_the_memory_estimate_is_refused_with_both_figures(service):
    svc, _, _ = service
    big = {"samples": [{"context_ids": [5] * 200, "continuation_ids": [6] * 50}] * 8, "config": {"micro_batch": 8}}
    svc.memory_limit = lambda: 30 << 20
    with pytest.raises(FieldError, match=r"needs about \d+ MiB \(estimate\), over the 30 MiB") as e:
        svc.submit(big)  # 8 rows of 250 tokens: about 60 MiB on the tiny model
    assert e.value.path == "config.micro_batch" and svc.status()["queue"] == []
    small = svc.submit({**big, "config": {"micro_batch": 1}})  # about 8 MiB
    assert 0 < svc.status()["queue"][0]["estimate_bytes"] <= 30 << 20 and small["state"] == "queued"
