"""Objectives on token IDs (SFT, ORPO, DPO), the job loop, and the request validators."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request
from amygdala.fields import FieldError
from amygdala.finetune.objectives import continuation_logprobs
from amygdala.finetune.trainer import TrainJobError, run_job

LIMITS = Limits(vocab_size=100, max_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    model, tok = tiny.make_model("llama")
    return model, tok


def _greedy(model, context, n):
    ids = torch.tensor([context])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(context):].tolist()


def test_logprobs_ignore_padding_and_count_only_the_continuation():
    model, _ = _model()
    alone = continuation_logprobs(model, [[2, 10, 11, 12]], [[20, 21]])
    batch = continuation_logprobs(model, [[2, 10, 11, 12], [2, 5]], [[20, 21], [7, 8, 9, 10, 11, 12]])
    torch.testing.assert_close(batch.total[0], alone.total[0], rtol=1e-5, atol=1e-5)
    assert batch.tokens.tolist() == [2.0, 6.0]
    with torch.no_grad():  # by hand: sum of log-softmax at the positions before each continuation token
        logits = model(torch.tensor([[2, 10, 11, 12, 20, 21]])).logits[0].log_softmax(-1)
    torch.testing.assert_close(alone.total[0], logits[3, 20] + logits[4, 21], rtol=1e-5, atol=1e-5)


def test_sft_makes_the_continuation_the_greedy_completion():
    model, _ = _model()
    context, continuation = [2, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45]
    assert _greedy(model, context, 6) != continuation
    opt, _ = build_optimizer(model, OptimizerSettings(kind="apollo-mini"))
    result = run_job(model, opt, [Sample(tuple(context), tuple(continuation))], JobConfig(learning_rate=1e-2, steps=30))
    assert result.steps == 30 and result.losses[-1] < result.losses[0] / 5
    assert _greedy(model, context, 6) == continuation


def _margin(model, samples):
    with torch.no_grad():
        c = continuation_logprobs(model, [s.context_ids for s in samples], [s.continuation_ids for s in samples])
        r = continuation_logprobs(model, [s.context_ids for s in samples], [s.rejected_ids for s in samples])
    return (c.total - r.total).mean().item()


PAIRS = [
    Sample((2, 10, 11), (30, 31, 32), (50, 51, 52)),
    Sample((2, 12, 13, 14), (33, 34), (53, 54, 55, 56)),
    Sample((2, 15), (35, 36, 37, 38), (57,)),
]


@pytest.mark.parametrize("objective,lr", [("orpo", 3e-3), ("dpo", 1e-3)])
def test_preference_objectives_raise_preferred_over_rejected(objective, lr):
    model, _ = _model()
    before = _margin(model, PAIRS)
    opt, _ = build_optimizer(model, OptimizerSettings(kind="apollo-mini"))
    result = run_job(model, opt, PAIRS, JobConfig(objective=objective, learning_rate=lr, steps=15, micro_batch=2))
    after = _margin(model, PAIRS)
    assert after > before + 2.0, (before, after)
    assert result.losses[-1] < result.losses[0]
    if objective == "dpo":  # the reference is the job's starting weights: the first loss is log 2
        assert result.losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)


def test_a_failed_job_says_which_steps_were_applied():
    model, _ = _model()
    opt, _ = build_optimizer(model, OptimizerSettings())
    norm = model.model.norm.weight

    def poison(step, loss):
        with torch.no_grad():
            norm[0] = float("nan")  # from step 2 on, every loss is NaN

    with pytest.raises(TrainJobError, match=r"step 2: the loss is nan; steps 1..1 were applied") as err:
        run_job(model, opt, [Sample((2, 10), (11, 12))], JobConfig(steps=5), on_step=poison)
    assert err.value.steps_applied == 1
    assert all(p.grad is None for p in model.parameters())


def _request(**sample):
    base = {"context_ids": [2, 5], "continuation_ids": [7, 8]}
    return {"samples": [{**base, **sample}], "config": {"objective": "sft", "learning_rate": 1e-4, "steps": 2}}


@pytest.mark.parametrize("body,field,match", [
    (_request(continuation_ids=[7, 100]), "samples[0].continuation_ids[1]", "100 is outside the vocabulary"),
    (_request(context_ids=[-1]), "samples[0].context_ids[0]", "outside the vocabulary"),
    (_request(continuation_ids=[]), "samples[0].continuation_ids", "empty"),
    (_request(context_ids=[]), "samples[0].context_ids", "empty"),
    (_request(continuation_ids=[7, 8.0]), "samples[0].continuation_ids[1]", "not an integer"),
    (_request(continuation_ids=[7, True]), "samples[0].continuation_ids[1]", "not an integer"),
    (_request(continuation_ids="7 8"), "samples[0].continuation_ids", "expected a list"),
    (_request(context_ids=list(range(10)), continuation_ids=list(range(7))), "samples[0].continuation_ids", "17 tokens, over the model's 16"),
    (_request(rejected_ids=[9]), "samples[0].rejected_ids", "only objectives orpo, dpo and dpop"),
    (_request(extra=[1]), "samples[0].extra", "unknown field"),
    ({"samples": [], "config": {}}, "samples", "non-empty list"),
    ({"samples": [[1, 2]], "config": {}}, "samples[0]", "expected an object"),
    ({"samples": [{"context_ids": [1]}]}, "samples[0].continuation_ids", "missing"),
    ({**_request(), "config": {"objective": "ppo"}}, "config.objective", "'ppo' is not one of"),
    ({**_request(), "config": {"learning_rate": "1e-5"}}, "config.learning_rate", "must be a number"),
    ({**_request(), "config": {"learning_rate": float("nan")}}, "config.learning_rate", "must be a number"),
    ({**_request(), "config": {"steps": 0}}, "config.steps", "integer in 1..10000"),
    ({**_request(), "config": {"steps": 2.5}}, "config.steps", "integer in 1.."),
    ({**_request(), "config": {"lr": 1}}, "config.lr", "unknown setting"),
    ({**_request(), "config": {"objective": "dpo"}}, "samples[0].rejected_ids", "missing; objective dpo"),
    ({**_request(), "config": []}, "config", "expected an object"),
    ({**_request(), "tokenizer": "x"}, "tokenizer", "unknown field"),
    ([1], "body", "expected an object"),
])
def test_bad_input_names_the_field(body, field, match):
    with pytest.raises(FieldError, match=match) as err:
        parse_request(body, LIMITS)
    assert err.value.path == field
    assert str(err.value).startswith(field + ": ")


def test_good_input_parses():
    body = {"samples": [{"context_ids": [2, 5], "continuation_ids": [7], "rejected_ids": [9, 9]}],
            "config": {"objective": "orpo", "learning_rate": 1, "steps": 3}}
    samples, config = parse_request(body, LIMITS)
    assert samples == [Sample((2, 5), (7,), (9, 9))]
    assert config == JobConfig(objective="orpo", learning_rate=1.0, steps=3)
    assert isinstance(config.learning_rate, float)


def test_limits_come_from_the_model_config():
    model, tok = _model()
    limits = Limits.from_config(model.config)
    assert limits.vocab_size == len(tok) and limits.max_length == 256
