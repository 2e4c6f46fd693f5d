"""APOLLO / APOLLO-Mini: exact steps against a hand computation (and apollo-torch when available),
convergence next to AdamW, state size, a state dict that loads with weights_only and resumes."""

from __future__ import annotations

import importlib
import io
import math
import os
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from helpers import tiny
from amygdala.finetune.apollo import (
    DEFAULT_RANK, MINI_ALPHA, Apollo, OptimizerError, OptimizerSettings, build_optimizer, split_parameters,
    state_nbytes,
)
from amygdala.finetune.inputs import JobConfig, Sample
from amygdala.finetune.trainer import run_job


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_apollo(w, grads, *, rank, alpha, tensor, gap, seed, lr, wd, b1=0.9, b2=0.999, eps=1e-6, gamma=1.01):
    """The paper's update written out step by step; returns the weights and whether the limiter acted."""
    w = w.clone()
    m = v = None
    prev = None
    limited = False
    tall = w.shape[0] >= w.shape[1]
    shape = (rank, w.shape[1]) if tall else (w.shape[0], rank)
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            if t > 1:
                seed = int(torch.randint(0, 2**63 - 1, (15,), generator=torch.Generator().manual_seed(seed))[-1])
            p = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)
        r = g @ p.T if tall else p.T @ g
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        rt = m / (v.sqrt() + eps)
        if tensor:
            s = rt.norm() / (r.norm() + 1e-8)
        elif tall:
            s = (rt.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]
        else:
            s = (rt.norm(dim=0) / (r.norm(dim=0) + 1e-8))[None, :]
        u = s * g
        n = u.norm()
        if prev is not None and n > gamma * prev:
            u = u * gamma * prev / n
            limited = True
        prev = u.norm()
        c = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = (w - c * alpha * u) * (1 - lr * wd)
    return w, limited


def hand_adamw(w, grads, *, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        c = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = (w - c * m / (v.sqrt() + eps)) * (1 - lr * wd)
    return w


def _grads(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    # growing gradients, so the norm-growth limiter has to act
    return [torch.randn(shape, generator=g) * (1 + 10 * i) for i in range(n)]


@pytest.mark.parametrize(
    "shape,rank,alpha,scale_type",
    [((12, 6), 3, 1.0, "channel"), ((5, 9), 2, 1.0, "channel"), ((7, 11), 1, MINI_ALPHA, "tensor")],
    ids=["tall-channel", "wide-channel", "mini"],
)
def test_steps_match_hand_computation(shape, rank, alpha, scale_type):
    torch.manual_seed(0)
    w0, b0 = torch.randn(shape), torch.randn(4)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = Apollo(
        [{"params": [w], "rank": rank, "alpha": alpha, "scale_type": scale_type, "update_proj_gap": 2}, {"params": [b]}],
        lr=0.01, weight_decay=0.1,
    )
    gw, gb = _grads(shape, 5, 1), _grads((4,), 5, 2)
    for g1, g2 in zip(gw, gb):
        w.grad, b.grad = g1.clone(), g2.clone()
        opt.step()
    # steps 1, 3, 5 draw a projection (the gap is 2): two seed advances are covered
    expected, limited = hand_apollo(w0, gw, rank=rank, alpha=alpha, tensor=scale_type == "tensor", gap=2, seed=1, lr=0.01, wd=0.1)
    assert limited
    assert (w.detach() - w0).abs().max() > 1e-2  # the weights did move
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach(), hand_adamw(b0, gb, lr=0.01, wd=0.1), rtol=1e-5, atol=1e-6)


def _oracle_module():
    """apollo-torch's apollo.py, imported without its package __init__ (which needs bitsandbytes).

    Found via $APOLLO_TORCH_DIR (a folder holding apollo_torch/, e.g. from
    `pip download apollo-torch --no-deps` and unzip) or an installed apollo_torch.
    """
    folder = os.environ.get("APOLLO_TORCH_DIR")
    if folder:
        root = Path(folder) / "apollo_torch"
    else:
        spec = importlib.util.find_spec("apollo_torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "apollo.py").is_file():
        return None
    pkg = types.ModuleType("_apollo_oracle")
    pkg.__path__ = [str(root)]
    sys.modules["_apollo_oracle"] = pkg
    return importlib.import_module("_apollo_oracle.apollo")


@pytest.mark.parametrize("scale_type,rank,alpha", [("channel", 4, 1.0), ("tensor", 1, MINI_ALPHA)], ids=["apollo", "mini"])
def test_matches_apollo_torch(scale_type, rank, alpha):
    oracle = _oracle_module()
    if oracle is None:
        pytest.skip("apollo-torch not available: set APOLLO_TORCH_DIR to an unpacked apollo-torch wheel")

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((48, 16), (16, 40), (7,))]

    ours_p, ref_p = params(), params()
    ours = Apollo([{"params": ours_p[:2], "rank": rank, "alpha": alpha, "scale_type": scale_type, "update_proj_gap": 3},
                   {"params": ours_p[2:]}], lr=0.01, weight_decay=0.1)
    ref = oracle.AdamW([{"params": ref_p[:2], "rank": rank, "proj": "random", "scale_type": scale_type, "scale": alpha**2,
                         "update_proj_gap": 3, "proj_type": "std"}, {"params": ref_p[2:]}], lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(10):  # projections regenerate at steps 1, 4, 7, 10
        for a, b in zip(ours_p, ref_p):
            grad = torch.randn(a.shape, generator=g) * (1 + step)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)


def _samples(n=8, seed=0):
    rng = random.Random(seed)
    return [Sample(tuple(rng.randrange(6, 150) for _ in range(6)), tuple(rng.randrange(6, 150) for _ in range(5))) for _ in range(n)]


def _train(kind: str, rank=None, steps=40, lr=3e-3):
    model, _ = tiny.make_model("llama")
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        m.weight.requires_grad_(False)
    opt, _ = build_optimizer(model, OptimizerSettings(kind=kind, rank=rank))
    result = run_job(model, opt, _samples(), JobConfig(learning_rate=lr, steps=steps))
    return model, opt, result.losses


def test_loss_decreases_comparably_to_adamw():
    _, _, adamw = _train("adamw")
    _, _, apollo = _train("apollo", rank=16)  # well below the tiny model's width of 64
    _, _, mini = _train("apollo-mini")
    drop = adamw[0] - adamw[-1]
    assert drop > 1.0
    for name, losses in (("apollo", apollo), ("apollo-mini", mini)):
        assert losses[0] == pytest.approx(adamw[0])
        assert losses[0] - losses[-1] >= 0.8 * drop, (name, losses[-1], adamw[-1])


def test_mini_state_is_tiny():
    model, mini, _ = _train("apollo-mini", steps=2)
    _, adamw, _ = _train("adamw", steps=2)
    low, _ = split_parameters(model)
    for _, p in low:  # rank 1: one moment value per channel of the larger dimension
        assert mini.state[p]["exp_avg"].numel() == max(p.shape)
    assert state_nbytes(mini) * 40 < state_nbytes(adamw)


def test_state_dict_loads_weights_only_and_resumes_exactly():
    def fresh():
        model, _ = tiny.make_model("llama")
        opt, _ = build_optimizer(model, OptimizerSettings(kind="apollo", rank=4, update_proj_gap=3))
        return model, opt

    samples, cfg = _samples(4), JobConfig(learning_rate=1e-2, steps=2)
    straight, opt = fresh()
    for _ in range(3):
        run_job(straight, opt, samples, cfg)

    resumed, opt = fresh()
    run_job(resumed, opt, samples, cfg)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    for s in state["state"].values():  # moments, limiter norm, counters; no projection
        assert set(s) <= {"step", "seed", "exp_avg", "exp_avg_sq", "norm"}
    # a new optimizer on the same weights (restart): projections are rebuilt from the seeds
    opt2, _ = build_optimizer(resumed, OptimizerSettings(kind="apollo", rank=4, update_proj_gap=3))
    opt2.load_state_dict(state)
    for _ in range(2):
        run_job(resumed, opt2, samples, cfg)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_low_rank_group_takes_2d_weights_only():
    with pytest.raises(OptimizerError, match=r"param group 0, parameter 1: shape \(4,\).*2-D weights only"):
        Apollo([{"params": [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))], "rank": 2}])


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="sgd"), "optimizer: 'sgd' is not one of"),
    (dict(kind="apollo-mini", rank=8), "rank: APOLLO-Mini is rank 1"),
    (dict(kind="apollo", rank=0), "rank: 0 must be an integer >= 1"),
])
def test_settings_are_checked(kwargs, match):
    with pytest.raises(OptimizerError, match=match):
        OptimizerSettings(**kwargs)


def test_defaults():
    assert DEFAULT_RANK == 64
    assert OptimizerSettings(kind="apollo").group_options() == dict(rank=64, alpha=1.0, scale_type="channel", update_proj_gap=200)
    assert OptimizerSettings().group_options()["rank"] == 1
    model, _ = tiny.make_model("llama")
    opt, names = build_optimizer(model, OptimizerSettings())
    low, plain = split_parameters(model)
    assert [g.get("rank") for g in opt.param_groups] == [1, None]
    assert all(p.dim() == 2 for _, p in low) and any(p.dim() == 1 for _, p in plain)
    assert names == [n for n, _ in low] + [n for n, _ in plain]


@pytest.mark.parametrize("low_rank", [False, True])
def test_bf16_updates_below_half_an_ulp_survive_in_expectation(low_rank):
    """Online learning rates move bf16 weights by less than half an ulp: round-to-nearest would
    drop every update; stochastic rounding keeps the mean trajectory of float32."""
    torch.manual_seed(0)
    shape = (200, 50) if low_rank else (10_000,)
    w0 = torch.full(shape, 0.05).bfloat16().float()  # a bf16 ulp here is 2**-12, about 2.4e-4
    grad = torch.ones(shape)

    def run(dtype, sr):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        group = {"params": [p], "rank": 1, "scale_type": "tensor", "alpha": 1.0} if low_rank else {"params": [p]}
        opt = Apollo([group], lr=5e-5 if low_rank else 1e-5, stochastic_rounding=sr)  # steps < 2e-5
        for _ in range(50):
            p.grad = grad.to(dtype)
            opt.step()
        return (p.detach().float() - w0).mean().item()

    exact = run(torch.float32, True)
    assert exact < -1e-4
    assert run(torch.bfloat16, False) == 0.0  # every update rounded away
    assert run(torch.bfloat16, True) == pytest.approx(exact, rel=0.1)
