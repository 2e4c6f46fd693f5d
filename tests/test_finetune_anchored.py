"""Anchored objectives on a tiny model (issue 27): the KL anchor keeps held neutral text where it
was, DPOP keeps the preferred likelihood from falling where DPO lets it fall, and early stop ends a
job whose held-out loss rises, with the best step's weights back in place. Each effect is measured
against the same training without it, in the same test."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer
from amygdala.finetune.inputs import JobConfig, Sample, split_holdout
from amygdala.finetune.objectives import continuation_logprobs, kl_to_reference, neutral_split, reference_distributions
from amygdala.finetune.trainer import run_job

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = Sample((2, 10, 11, 12, 13), (40, 41, 42, 43, 44, 45))
NEUTRAL = ((2, 60, 61, 62, 63, 64, 65), (2, 70, 71, 72, 73), (2, 80, 81, 82, 83, 84))


def _job(model, samples, **config):
    opt, _ = build_optimizer(model, OptimizerSettings())
    return run_job(model, opt, samples, JobConfig(**config))


def _mean_logp(model, sample: Sample) -> float:
    with torch.no_grad():
        return continuation_logprobs(model, [sample.context_ids], [sample.continuation_ids]).mean.item()


def _neutral_kl(model, reference) -> float:
    contexts, continuations = zip(*map(neutral_split, NEUTRAL))
    with torch.no_grad():
        return kl_to_reference(model, contexts, continuations, reference).mean().item()


def test_kl_to_reference_is_the_kl_of_the_next_token_distributions():
    """Oracle: KL(ref || pi) by hand from two models' log-softmax, at every position after the first."""
    ref_model, _ = tiny.make_model("llama")
    model, _ = tiny.make_model("llama")
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.mul_(1.5)
    seq = NEUTRAL[1]
    reference = reference_distributions(ref_model, *zip(neutral_split(seq)))
    with torch.no_grad():
        p_ref = ref_model(torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
        p_new = model(torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
    by_hand = (p_ref.exp() * (p_ref - p_new)).sum(-1).mean()
    got = kl_to_reference(model, *zip(neutral_split(seq)), reference)
    torch.testing.assert_close(got[0], by_hand, rtol=1e-4, atol=1e-6)
    assert kl_to_reference(ref_model, *zip(neutral_split(seq)), reference)[0].abs().item() < 1e-6  # itself: 0


def test_the_anchor_keeps_held_neutral_text_where_plain_sft_moves_it():
    runs = {}
    for anchor in (0.0, 1.0):
        model, _ = tiny.make_model("llama")
        reference = reference_distributions(model, *zip(*map(neutral_split, NEUTRAL)))
        before = _mean_logp(model, SAMPLE)
        _job(model, [SAMPLE], learning_rate=1e-2, steps=15, anchor=anchor, neutral=NEUTRAL if anchor else ())
        runs[anchor] = (_neutral_kl(model, reference), _mean_logp(model, SAMPLE) - before)
    (kl_plain, gain_plain), (kl_anchored, gain_anchored) = runs[0.0], runs[1.0]
    assert kl_plain > 1.0, runs  # the untouched text moved: the case the anchor is for
    assert kl_anchored < 0.2 and kl_anchored < kl_plain / 10, runs
    assert gain_anchored > 1.0, runs  # and the job still learned its sample (nats per token)
    assert gain_plain > gain_anchored


def _planted_pair_model():
    """A tiny model whose rejected token's output row is twice the preferred one's: their logit
    margin is -w.h, so DPO can only widen it by moving h against w, which lowers the preferred
    logit too: the case where DPO lowers both likelihoods while their margin grows."""
    model, _ = tiny.make_model("llama")
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[40] *= 3
        w[41] = 2 * w[40]
    return model


PAIRS = [Sample((2, 10, 11), (40,), (41,)), Sample((2, 12, 13, 14), (40,), (41,))]


def _chosen_and_margin(model) -> tuple[float, float]:
    with torch.no_grad():
        c = continuation_logprobs(model, [s.context_ids for s in PAIRS], [s.continuation_ids for s in PAIRS]).total
        r = continuation_logprobs(model, [s.context_ids for s in PAIRS], [s.rejected_ids for s in PAIRS]).total
    return c.mean().item(), (c - r).mean().item()


def test_dpop_keeps_the_preferred_likelihood_where_dpo_lowers_it():
    after = {}
    for objective in ("dpo", "dpop"):
        model = _planted_pair_model()
        chosen0, margin0 = _chosen_and_margin(model)
        result = _job(model, PAIRS, objective=objective, learning_rate=1e-3, steps=20)
        chosen, margin = _chosen_and_margin(model)
        after[objective] = (chosen - chosen0, margin - margin0)
        assert result.losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # both start at log 2
    (dpo_chosen, dpo_margin), (dpop_chosen, dpop_margin) = after["dpo"], after["dpop"]
    assert dpo_margin > 3 and dpo_chosen < -2, after  # DPO: the margin grew by lowering the preferred answer too
    assert dpop_margin > 1 and dpop_chosen > -0.5, after  # DPOP: the margin grew, the preferred stayed


def test_dpop_penalty_is_zero_until_the_preferred_falls_below_the_reference():
    """Oracle: at the start (pi = ref) DPOP's loss is DPO's; with the reference raised by d, it adds lambda * d."""
    from amygdala.finetune.objectives import dpo_loss, dpop_loss, reference_logprobs

    model, _ = tiny.make_model("llama")
    ref_c, ref_r = reference_logprobs(model, PAIRS, 8)
    with torch.no_grad():
        same = dpop_loss(model, PAIRS, ref_c, ref_r, 0.1, 3.0), dpo_loss(model, PAIRS, ref_c, ref_r, 0.1)
        torch.testing.assert_close(same[0], same[1])
        raised = dpop_loss(model, PAIRS, ref_c + 2.0, ref_r, 0.1, 3.0) - dpo_loss(model, PAIRS, ref_c + 2.0, ref_r, 0.1)
    torch.testing.assert_close(raised, torch.full((2,), 6.0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- early stop
TRAIN = Sample((2, 10, 11, 12), (40, 41, 42))


def test_early_stop_on_a_rising_heldout_loss_puts_the_best_weights_back():
    """The held-out sample asks the training context for another continuation: once the job
    learns the training one, every step raises the held-out loss. The job stops ``patience``
    rises after its best evaluation and ends with that step's weights: bit for bit those of a
    job of ``best_step`` steps (the oracle, run apart)."""
    held = Sample(TRAIN.context_ids, (50, 51, 52))
    samples = [TRAIN, held]
    assert split_holdout(samples, 0.5) == ([TRAIN], [held])  # the last share is held out
    model, _ = tiny.make_model("llama")
    result = _job(model, samples, learning_rate=1e-2, steps=20, holdout=0.5, patience=3)
    losses = result.heldout_losses
    assert result.stopped_early and len(losses) == result.steps + 1
    assert result.best_step == losses.index(min(losses)) and result.steps == result.best_step + 3
    assert all(b > a for a, b in zip(losses[result.best_step:], losses[result.best_step + 1:])), losses
    assert losses[-1] > min(losses) + 0.5, losses
    oracle, _ = tiny.make_model("llama")
    if result.best_step:
        _job(oracle, [TRAIN], learning_rate=1e-2, steps=result.best_step)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert torch.equal(p, q), name


def test_a_falling_heldout_loss_runs_every_step_and_keeps_the_last():
    model, _ = tiny.make_model("llama")
    result = _job(model, [TRAIN, TRAIN], learning_rate=1e-2, steps=6, holdout=0.5)
    assert not result.stopped_early and result.steps == 6 and result.best_step == 6
    assert result.heldout_losses[-1] < result.heldout_losses[0] / 2
    assert _mean_logp(model, TRAIN) == pytest.approx(-result.heldout_losses[-1], abs=1e-4)  # the weights are step 6's


def test_a_job_is_never_trained_on_its_heldout_samples():
    """Oracle: with holdout, the job trains exactly as a job on the training share alone."""
    held = Sample((2, 30, 31), (60, 61))
    a, _ = tiny.make_model("llama")
    b, _ = tiny.make_model("llama")
    _job(a, [TRAIN, held], learning_rate=1e-2, steps=1, holdout=0.5)
    _job(b, [TRAIN], learning_rate=1e-2, steps=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
