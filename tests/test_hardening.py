"""Issue 14, without vLLM: nothing poisons the weights, every writer of a folder takes one lock,
every bad input (huge numbers included) is a field error, the scores loop survives garbage,
sockets stay private, and the training routes are not put on the network by accident.

The live-server half (every route with huge numbers, a Schemathesis run, the soak and kill -9
trials) is tests/test_hardening_live.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from safetensors.torch import load_file, save_file

import tiny
from amygdala.cli.main import main as cli
from amygdala import checkpoint
from amygdala.checkpoint import layout
from amygdala.finetune import protocol, shared_weights, worker
from amygdala.checkpoint import JOURNAL, CheckpointError
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request
from amygdala.fields import FieldError
from amygdala.finetune.trainer import Trainer, TrainJobError
from amygdala.finetune.service import QueueFull, TrainingService, UnknownJob

HUGE = 10**400
KEY = "hardening-key"
LIMITS = Limits(vocab_size=1000, max_length=1024)
SAMPLE = {"context_ids": [2, 10, 11], "continuation_ids": [40, 41, 42], "rejected_ids": [50, 51, 52]}


def _trainer(folder: Path) -> tuple[Trainer, dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    tiny.make_model("llama", folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    model = shared_weights.view_model(AutoConfig.from_pretrained(folder), served)
    return Trainer(model, folder, served=served), served


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- 1. non-finite updates
def test_dpo_with_a_huge_beta_skips_the_step_and_leaves_the_weights_as_they_were(tmp_path, one_thread):
    """The issue's reproduction, past the request check (a Python caller can build any JobConfig)."""
    trainer, served = _trainer(tmp_path / "model")
    before = {n: t.clone() for n, t in served.items()}
    sample = Sample((2, 10, 11), (40, 41, 42), (50, 51, 52))
    with pytest.raises(TrainJobError, match=r"step 1: the gradient norm is (inf|nan); steps 1\.\.0 were applied") as e:
        trainer.run([sample], JobConfig(objective="dpo", beta=1e37, learning_rate=1e-2, steps=5))
    assert e.value.steps_applied == 0
    for name, t in served.items():
        assert torch.equal(t, before[name]), name
    assert trainer.run([sample], JobConfig(objective="dpo", beta=0.1, learning_rate=1e-3, steps=2)).steps == 2
    assert all(torch.isfinite(t).all() for t in served.values())


def test_objective_weights_are_bounded():
    for key, value in (("beta", 1e37), ("beta", 10.5), ("beta", 0), ("orpo_lambda", 11), ("orpo_lambda", -1)):
        with pytest.raises(FieldError) as e:
            parse_request({"samples": [SAMPLE], "config": {"objective": "dpo", key: value}}, LIMITS)
        assert e.value.path == f"config.{key}"
    _, config = parse_request({"samples": [SAMPLE], "config": {"objective": "dpo", "beta": 10, "orpo_lambda": 10}}, LIMITS)
    assert (config.beta, config.orpo_lambda) == (10.0, 10.0)


def test_a_non_finite_tensor_is_never_synced_and_status_says_so(tmp_path, one_thread):
    trainer, served = _trainer(tmp_path / "model")
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


# --------------------------------------------------------------------------- 2. one writer lock
HOLD = """
import sys, time
from amygdala import checkpoint
with checkpoint.writer_lock(sys.argv[1], holder="training worker"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_cli_sync_waits_for_another_writer_then_names_it(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    holder = _hold(folder, 60)
    try:
        assert cli(["checkpoint", "sync", "--model-dir", str(folder), "--wait", "0.3"]) != 0
        err = capsys.readouterr().err
        assert f"another training worker (pid {holder.pid}) holds this model folder" in err and "waited 0.3 s" in err
        with pytest.raises(checkpoint.FolderBusy):
            checkpoint.sync(folder, {}, wait=0.1)
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(folder, 1.0)  # released while the CLI waits: it then goes ahead
    assert cli(["checkpoint", "sync", "--model-dir", str(folder), "--wait", "60"]) == 0
    assert holder.wait(10) == 0 and "nothing pending" in capsys.readouterr().out


def test_recovery_refuses_a_journal_written_against_other_files(tmp_path):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    weights = folder / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}
    served = layout.to_served(tensors)
    served["model.norm.weight"] += 1
    entries = checkpoint.read_entries(folder)
    writer = checkpoint._JournalWriter(folder / JOURNAL)  # committed, never applied: a crash at the commit point
    blocks = checkpoint._Blocks(writer.block)
    for mm, e, name, new, changed in checkpoint._changes(folder, checkpoint.checkpoint_views(folder, served, entries), entries):
        blocks.add(mm, e, new, changed)
    blocks.flush()
    writer.close()
    save_file(tensors, weights, metadata={"format": "pt", "rewritten": "yes"})  # the same tensors, another file
    other = weights.read_bytes()
    with pytest.raises(CheckpointError, match=r"written against model\.safetensors of \d+ bytes, but that file differs"):
        checkpoint.recover(folder)
    assert weights.read_bytes() == other and (folder / JOURNAL).exists()  # nothing replayed, nothing lost


# --------------------------------------------------------------------------- 3. the /train body
def _client(monkeypatch, **env: str):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve import config, finetune_routes

    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def test_train_body_is_capped_whether_declared_or_streamed(monkeypatch):
    client = _client(monkeypatch, AMYGDALA_TRAIN_MAX_BODY="6000")
    body = json.dumps({"samples": [{"context_ids": [2] * 3000, "continuation_ids": [3]}]}).encode()
    r = client.post("/train", content=body)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body" and "AMYGDALA_TRAIN_MAX_BODY" in r.json()["error"]["message"]
    r = client.post("/train", content=(body[i : i + 100] for i in range(0, len(body), 100)))  # chunked: no Content-Length
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
    r = client.post("/train", content=b'{"samples": [' + b"7" * 5000 + b"]}")  # past Python's int-parsing limit
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_a_bad_max_body_setting_names_the_variable(monkeypatch):
    from amygdala.serve.config import ConfigError

    for value in ("lots", "-1", "inf"):
        with pytest.raises(ConfigError, match=rf"^AMYGDALA_TRAIN_MAX_BODY={value!r}: "):
            _client(monkeypatch, AMYGDALA_TRAIN_MAX_BODY=value)


# --------------------------------------------------------------------------- 4. job bounds
def test_tokens_per_micro_batch_are_bounded():
    long = {"context_ids": [5] * 500, "continuation_ids": [6] * 12}
    with pytest.raises(FieldError, match=r"17 rows x 512 tokens = 8704, over the limit of 8192 tokens") as e:
        parse_request({"samples": [long] * 17, "config": {"micro_batch": 17}}, LIMITS)
    assert e.value.path == "config.micro_batch"
    parse_request({"samples": [long] * 17, "config": {"micro_batch": 16}}, LIMITS)  # 16 x 512 = 8192: at the limit
    pair = {**long, "rejected_ids": [7] * 12}
    with pytest.raises(FieldError, match="16 rows x 512 tokens"):  # orpo/dpo: preferred and rejected rows
        parse_request({"samples": [pair] * 8, "config": {"objective": "orpo", "micro_batch": 16}}, Limits(1000, 1024, max_batch_tokens=8000))


@pytest.fixture()
def service(tmp_path, one_thread):
    trainer, served = _trainer(tmp_path / "model")
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
    _wait(lambda: (c := svc.status()["current"]) and c["step"] >= 2, 120, "two steps")
    svc.cancel(running["job_id"])
    status = _wait(lambda: (s := svc.status())["state"] == "idle" and len(s["finished"]) == 2 and s, 120, "the cancel")
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


# --------------------------------------------------------------------------- 5. huge integers
@pytest.mark.parametrize("field, value", [
    ("config.learning_rate", HUGE), ("config.beta", HUGE), ("config.orpo_lambda", HUGE), ("config.steps", HUGE),
    ("config.micro_batch", HUGE), ("config.learning_rate", -HUGE), ("samples[0].context_ids[1]", HUGE),
    ("samples[0].continuation_ids[0]", -HUGE), ("samples[0].rejected_ids[2]", HUGE),
])
def test_huge_numbers_in_a_training_request_are_field_errors(field, value):
    body = {"samples": [json.loads(json.dumps(SAMPLE))], "config": {"objective": "orpo"}}
    if field.startswith("config."):
        body["config"][field.split(".")[1]] = value
    else:
        key, index = field.split(".")[1].split("[")
        body["samples"][0][key][int(index.rstrip("]"))] = value
    with pytest.raises(FieldError) as e:
        parse_request(body, LIMITS)
    assert e.value.path == field and len(str(e.value)) < 300


@pytest.fixture(scope="module")
def readout(tmp_path_factory):
    from serve_helpers import make_readout

    from amygdala.readout import Readout

    return Readout.load(make_readout(tmp_path_factory.mktemp("readout") / "r"))


def _spec(readout, fields: dict, max_strength: float = 1000.0):
    from amygdala.serve.spec import ModelShape, parse

    return parse(fields, None, readout, ModelShape(4, 128, max_strength))


@pytest.mark.parametrize("fields, param", [
    ({"steer": [{"concept": "calm", "strength": HUGE}]}, "steer[0].strength"),
    ({"steer": [{"concept": "calm", "strength": -HUGE}]}, "steer[0].strength"),
    ({"steer": [{"concept": "calm", "strength": 1.0, "layers": [HUGE]}]}, "steer[0].layers"),
    ({"steer": [{"vector": [HUGE] + [0.0] * 127, "strength": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": [1e300] * 128, "strength": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": [1e-300] * 128, "strength": 1.0}]}, "steer[0].vector"),
    ({"readout": 10**5000}, "readout"),
    ({"readout": HUGE}, "readout"),
])
def test_huge_numbers_in_readout_and_steering_are_field_errors(readout, fields, param):
    from amygdala.fields import FieldError

    with pytest.raises(FieldError) as e:
        _spec(readout, fields)
    assert e.value.path == param and len(str(e.value)) < 300


# --------------------------------------------------------------------------- 8. steering strength
def test_steering_strength_is_bounded_by_the_setting(readout, monkeypatch):
    from amygdala.serve import config
    from amygdala.fields import FieldError

    for strength in (1e300, 1000.5, -2000, float("inf"), float("nan"), True, "4"):
        with pytest.raises(FieldError, match=r"^steer\[0\]\.strength: must be a number within \+-1000 "):
            _spec(readout, {"steer": [{"concept": "calm", "strength": strength}]})
    assert _spec(readout, {"steer": [{"concept": "calm", "strength": -1000}]}).steer[0].strength == -1000.0
    assert _spec(readout, {"steer": [{"concept": "calm", "strength": 5000}]}, max_strength=10_000).steer[0].strength == 5000.0
    monkeypatch.delenv(config.MAX_STRENGTH_ENV, raising=False)
    assert config.max_steer_strength() == config.DEFAULT_MAX_STRENGTH
    monkeypatch.setenv(config.MAX_STRENGTH_ENV, "50")
    assert config.max_steer_strength() == 50.0
    monkeypatch.setenv(config.MAX_STRENGTH_ENV, "nan")
    with pytest.raises(config.ConfigError, match="^AMYGDALA_MAX_STEER_STRENGTH='nan': "):
        config.max_steer_strength()


# --------------------------------------------------------------------------- 6. scores receiver, sockets
def test_the_scores_loop_survives_malformed_messages(tmp_path):
    from amygdala.serve import channel

    address = f"ipc://{tmp_path / 'scores.sock'}"
    got: list[tuple] = []
    rows = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    good = channel.encode(["t1", "t1"], ["r1", "r1"], [0, 1], rows, [0])
    garbage = [
        [b"only one frame"], [b"not json", b""], [b"[1, 2]", b""], [b'{"t": 1, "r": 2, "k": 3, "shape": [1]}', b"\0" * 4],
        [json.dumps({"t": ["a"], "r": ["b"], "k": [0], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": ["a", "b"], "r": ["b"], "k": [0, 1], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": [["a"], "b"], "r": ["b", "c"], "k": [0, 1], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": ["a"], "r": ["b"], "k": [0], "shape": [1, 5]}).encode(), b"\0" * 3], good + [b"extra"],
    ]

    async def run() -> int:
        receiver = channel.Receiver(address, lambda *a: got.append(a))
        receiver.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(address)
        for frames in garbage:
            push.send_multipart(frames)
        push.send_multipart(good)
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        push.close(0)
        receiver.close()
        return receiver.bad_messages

    bad = asyncio.run(run())
    assert bad == len(garbage)
    assert [(t, r, k, layers) for t, r, k, _, layers in got] == [("t1", "r1", 0, [0]), ("t1", "r1", 1, [0])]
    assert np.array_equal(got[1][3], rows[1])


def test_every_socket_lives_in_a_private_runtime_folder(monkeypatch, tmp_path):
    from amygdala.serve import config

    for env in (config.RUNTIME_ENV, config.CHANNEL_ENV, config.CONTROL_ENV, config.EVENTS_ENV):
        # setenv first so the undo is recorded even when the variable is absent: channel_address()
        # exports these, and leaked into this process they would give later test servers one socket.
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    addresses = [config.channel_address(), *config.finetune_addresses()]
    folder = Path(os.environ[config.RUNTIME_ENV])
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(a.startswith("ipc://") and Path(a[6:]).parent == folder for a in addresses)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv(config.RUNTIME_ENV, str(shared))
    with pytest.raises(config.ConfigError, match="must be an existing folder of yours with mode 0700"):
        config.channel_address()
    monkeypatch.setenv(config.RUNTIME_ENV, str(folder))
    monkeypatch.setenv(config.CHANNEL_ENV, "tcp://0.0.0.0:5555")
    with pytest.raises(config.ConfigError, match=r"^AMYGDALA_SERVE_CHANNEL=tcp://0\.0\.0\.0:5555: every socket"):
        config.channel_address()


# --------------------------------------------------------------------------- 7. remote training
def test_amygdala_serve_refuses_a_public_host_with_training_unless_allowed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("vllm")
    from amygdala.serve import config

    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    monkeypatch.delenv(config.ALLOW_REMOTE_ENV, raising=False)
    serve = ["serve", "--model", str(folder), "--dry-run", "--host"]
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert cli([*serve, host]) != 0
        assert f"--host {host}: with AMYGDALA_API_KEY set the training routes" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert cli([*serve, host]) == 0
    assert "AMYGDALA_ALLOW_REMOTE_TRAINING" not in capsys.readouterr().out
    assert cli([*serve, "0.0.0.0", "--allow-remote-training"]) == 0
    assert "--host 0.0.0.0" in capsys.readouterr().out
    monkeypatch.delenv(config.API_KEY_ENV)  # no training routes: any host, as before
    assert cli(["serve", "--model", str(folder), "--readout", str(_readout_dir(tmp_path)), "--dry-run", "--host", "0.0.0.0"]) == 0


def _readout_dir(tmp_path: Path) -> Path:
    from serve_helpers import make_readout

    tiny_hidden = 64  # tiny.make_model's hidden size
    return make_readout(tmp_path / "readout", hidden=tiny_hidden)


def test_plain_vllm_with_training_on_a_public_host_warns_loudly(monkeypatch, caplog):
    from amygdala.serve import config, finetune_routes

    monkeypatch.delenv(config.ALLOW_REMOTE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.amygdala"):
        finetune_routes.warn_if_remote("127.0.0.1")
        assert caplog.records == []
        finetune_routes.warn_if_remote(None)  # vLLM's default: every interface
    assert len(caplog.records) == 1 and "WARNING: the training routes (/train, /checkpoint) are reachable from the network on every interface" in caplog.text


# --------------------------------------------------------------------------- wrapped routes' body check
from fastapi import Request  # noqa: E402 - for the endpoint's annotations below (resolved at module level)
from pydantic import BaseModel, model_validator  # noqa: E402


class _Body(BaseModel):
    """A request model with a validator that breaks on a malformed body, as vLLM's CompletionRequest's does."""

    options: dict | None = None
    fail: bool = False

    @model_validator(mode="before")
    @classmethod
    def count(cls, data):
        return {**data, "n": len(data["options"]).get("x")} if isinstance(data.get("options"), dict) else data


async def _endpoint(body: _Body, raw: Request):
    from amygdala.serve.routes import BodyCheckedRoute

    setattr(raw.state, BodyCheckedRoute.STARTED, True)
    if body.fail:
        raise RuntimeError("a server bug after the body was read")
    return {"ok": True}


def test_a_request_model_that_raises_on_a_malformed_body_is_a_400_not_a_500():
    """What the fuzzer found: vLLM's CompletionRequest raises AttributeError on ``structured_outputs: 1.5``."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve.routes import BodyCheckedRoute

    app = FastAPI()
    app.router.add_api_route("/x", _endpoint, methods=["POST"], route_class_override=BodyCheckedRoute)
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/x", json={"options": {"a": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "AttributeError" in r.json()["error"]["message"]
    assert client.post("/x", json={"options": 3}).status_code == 422  # FastAPI's own validation answer, unchanged
    assert client.post("/x", json={}).json() == {"ok": True}
    assert client.post("/x", json={"fail": True}).status_code == 500  # after the endpoint started: not the body's fault
