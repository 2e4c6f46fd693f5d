"""The anchored objectives' request fields (config.anchor, neutral, dpop_lambda, holdout,
patience): each bad value is one 400 naming the field; their memory is in the job's estimate;
an early-stopped job is reported done, with its held-out losses."""

from __future__ import annotations

import threading

import pytest

from helpers.training import tiny_trainer, wait_until
from amygdala.fields import FieldError
from amygdala.finetune import budget, memory, protocol, worker
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request
from amygdala.finetune.service import TrainingService

LIMITS = Limits(vocab_size=100, max_length=16)
PAIR = {"context_ids": [2, 5], "continuation_ids": [7, 8], "rejected_ids": [9]}


def _body(config: dict, samples=None) -> dict:
    return {"samples": samples or [{"context_ids": [2, 5], "continuation_ids": [7, 8]}], "config": config}


@pytest.mark.parametrize("body,field,match", [
    (_body({"anchor": -0.1}), "config.anchor", r"must be a number in \[0, 100\]"),
    (_body({"anchor": float("inf")}), "config.anchor", "must be a number"),
    (_body({"anchor": "0.1"}), "config.anchor", "must be a number"),
    (_body({"anchor": 0.1, "neutral": "text"}), "config.neutral", "expected a list of token-ID lists"),
    (_body({"anchor": 0.1, "neutral": [[2, 3], [4]]}), "config.neutral[1]", "1 tokens; give 2..16"),
    (_body({"anchor": 0.1, "neutral": [[2, 300]]}), "config.neutral[0][1]", "outside the vocabulary"),
    (_body({"anchor": 0.1, "neutral": [[2, 3.5]]}), "config.neutral[0][1]", "not an integer"),
    (_body({"neutral": [[2, 3]]}), "config.neutral", "only the anchor uses it"),
    (_body({"anchor": 0.1, "neutral": [[2, 3]] * 4, "micro_batch": 4}), None, None),
    (_body({"objective": "dpop", "dpop_lambda": 101}, [PAIR]), "config.dpop_lambda", r"in \[0, 100\]"),
    (_body({"objective": "dpop"}), "samples[0].rejected_ids", "missing; objective dpop"),
    (_body({"holdout": 1.0}), "config.holdout", r"in \[0, 1\)"),
    (_body({"holdout": -0.2}), "config.holdout", r"in \[0, 1\)"),
    (_body({"holdout": 0.2}), "config.holdout", "leaves none to train on"),
    (_body({"patience": 0}), "config.patience", r"integer in 1\.\.100"),
    (_body({"patience": 2.5}), "config.patience", "integer in"),
])
def test_bad_anchored_fields_name_the_field(body, field, match):
    if field is None:  # the good neighbour of the bad cases around it
        parse_request(body, LIMITS)
        return
    with pytest.raises(FieldError, match=match) as err:
        parse_request(body, LIMITS)
    assert err.value.path == field and str(err.value).startswith(field + ": ")


def test_neutral_forwards_are_held_to_the_batch_limit():
    limits = Limits(vocab_size=100, max_length=16, max_batch_tokens=40)
    with pytest.raises(FieldError, match="neutral sequences 0..3 make one forward") as err:
        parse_request(_body({"anchor": 1, "neutral": [[2] * 16] * 4, "micro_batch": 4}), limits)
    assert err.value.path == "config.micro_batch"


def test_anchored_fields_parse_with_their_defaults():
    samples, config = parse_request(_body({"objective": "dpop", "anchor": 1, "neutral": [[2, 3, 4]], "holdout": 0.5},
                                          [PAIR, PAIR]), LIMITS)
    assert samples == [Sample((2, 5), (7, 8), (9,))] * 2
    assert config == JobConfig(objective="dpop", anchor=1.0, neutral=((2, 3, 4),), holdout=0.5)
    assert isinstance(config.anchor, float) and isinstance(config.holdout, float)
    defaults = JobConfig()  # today's behaviour: no anchor, no holdout
    assert (defaults.anchor, defaults.holdout, defaults.neutral, defaults.patience, defaults.dpop_lambda) == (0.0, 0.0, (), 2, 1.0)


def test_the_estimate_counts_the_references_and_the_best_weights(tmp_path):
    """Oracle: the anchor adds one float32 distribution per anchored position (each micro-batch
    padded to its longest continuation; a neutral sequence: every position after the first), the
    holdout one copy of the trainable weights."""
    trainer, _ = tiny_trainer(tmp_path / "model")
    dims = trainer.dims
    samples = [Sample((2, 5), (7, 8, 9)), Sample((2, 5, 6), (7,)), Sample((3,), (4, 5))]
    plain = JobConfig(micro_batch=2)
    base = budget.estimate_bytes(samples, plain, dims)
    positions = 2 * 3 + 1 * 2  # micro-batches [3, 1] -> 3 positions x 2 rows, [2] -> 2 x 1
    anchored = JobConfig(micro_batch=2, anchor=0.1)
    assert budget.estimate_bytes(samples, anchored, dims) - base == memory.reference_bytes(positions, dims.shapes.vocab)
    assert memory.reference_bytes(positions, dims.shapes.vocab) == positions * dims.shapes.vocab * 4
    with_neutral = JobConfig(micro_batch=2, anchor=0.1, neutral=((2, 3, 4, 5),))  # 3 positions; its forward is smaller
    assert budget.estimate_bytes(samples, with_neutral, dims) - base == memory.reference_bytes(positions + 3, dims.shapes.vocab)
    assert budget.estimate_bytes(samples, JobConfig(micro_batch=2, holdout=0.3), dims) - base == dims.gradient_bytes


@pytest.fixture()
def service(tmp_path, one_thread):
    trainer, _ = tiny_trainer(tmp_path / "model")
    svc = TrainingService(trainer, sync_delay=3600)
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    thread.start()
    yield svc
    stop.set()
    thread.join(30)


def test_an_early_stopped_job_is_done_and_reports_its_heldout_losses(service):
    train = {"context_ids": [2, 10, 11, 12], "continuation_ids": [40, 41, 42]}
    held = {**train, "continuation_ids": [50, 51, 52]}  # the same context, another answer: its loss rises
    job = service.submit(_body({"learning_rate": 1e-2, "steps": 50, "holdout": 0.5, "patience": 2}, [train, held]))
    status = wait_until(lambda: (s := service.status())["finished"] and s, 120, "the job")
    ran = status["finished"][0]
    assert ran["id"] == job["job_id"] and ran["state"] == "done" and "error" not in ran
    assert ran["stopped_early"] and ran["step"] == ran["best_step"] + 2 < 50
    assert len(ran["heldout_losses"]) == ran["step"] + 1 and len(ran["losses"]) == ran["step"]


def test_a_bad_anchored_field_is_a_400_reply_naming_it(service):
    reply = worker.handle(service, protocol.request(protocol.SUBMIT, request=_body({"anchor": -1})), lambda r: None)
    assert not reply["ok"] and reply["error"]["field"] == "config.anchor" and reply["error"].get("status", 400) == 400
    assert service.status()["queue"] == [] and service.status()["finished"] == []
