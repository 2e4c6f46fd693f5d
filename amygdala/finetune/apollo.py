"""APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270): AdamW-like updates with SGD-like memory.

Why this optimizer: the online trainer updates the weights a server is serving, in the same
memory, so optimizer state competes with the KV cache. AdamW keeps two full copies of every
weight; APOLLO keeps its moments in a random rank-r projection of each 2-D weight's gradient and
only uses them to learn a *scaling* of the raw gradient (per channel, or per tensor for Mini).

Per low-rank weight W (m x n, torch shape; d = min(m, n) is projected, the max(m, n) channels
stay), at step t (counted from 1):

1. P: a Gaussian N(0, 1/r) matrix, r x n when m >= n (R = G P^T, m x r) or m x r when m < n
   (R = P^T G, r x n). It is regenerated from a seed when (t - 1) is a multiple of
   ``update_proj_gap``; only the seed is stored (P is a cache, rebuilt after a restore).
2. Adam moments of R: M = b1 M + (1 - b1) R, V = b2 V + (1 - b2) R^2, R~ = M / (sqrt(V) + eps).
3. Scaling: per channel s_k = ||R~_k|| / (||R_k|| + 1e-8) over the r-long slices (APOLLO), or one
   s = ||R~||_F / (||R||_F + 1e-8) (tensor-wise, APOLLO-Mini). U = s * G, the raw gradient scaled.
4. Norm-growth limiter (from Fira): if ||U|| grew by more than ``limiter`` (1.01) since the last
   step, shrink U to ``limiter`` times the last norm. Then U = alpha * U.
5. W -= c U with c = lr sqrt(1 - b2^t) / (1 - b1^t) (bias correction in the step size), then
   decoupled weight decay W *= (1 - lr * weight_decay).

bf16 weights are updated in float32 and written back with stochastic rounding (on by default,
``stochastic_rounding``): the served weights are the only copy, with no float32 master
weights, and round-to-nearest would discard updates smaller than half a bf16 ulp.

Parameters in a group without ``rank`` run plain AdamW (same c, same eps placement) in the same
optimizer: embeddings, norms, biases. Only 2-D tensors may be in a low-rank group.

Choices, where paper and reference code leave room (see docs/finetuning.md):

- ``alpha`` is the paper's alpha, the multiplier of the update: apollo-torch's ``scale`` is
  alpha**2 (it multiplies by sqrt(scale)). APOLLO-Mini's default is sqrt(128).
- P is drawn in float32 by a CPU generator and then moved to the weight's device and dtype, so a
  state saved on one device resumes with the same projections on another. The initial seed of
  a weight is its 1-based position over all groups; after each regeneration the seed advances to
  the last of 15 int63 draws of a CPU generator seeded with the old seed. On CPU both equal
  apollo-torch, so its update is a test oracle step for step.
- rank is clipped to min(m, n): a larger rank adds memory and no information.
- The state holds tensors and ints only (no projector object), so ``state_dict()`` loads with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from amygdala import AmygdalaError
from amygdala.models.layers import find_layers

#: Rank of APOLLO's projection unless told otherwise (the original system's one constant).
DEFAULT_RANK = 64
#: APOLLO-Mini: rank 1, one scaling factor per tensor, update multiplied by sqrt(128).
MINI_RANK = 1
MINI_ALPHA = math.sqrt(128.0)
#: The norm-growth limiter's gamma: an update's norm may grow by 1% per step at most.
LIMITER = 1.01
_SEED_ADVANCE = 15
_INT63 = torch.iinfo(torch.int64).max

OptimizerKind = Literal["apollo", "apollo-mini", "adamw"]
KINDS: tuple[str, ...] = ("apollo", "apollo-mini", "adamw")


class OptimizerError(AmygdalaError):
    """An optimizer set-up that cannot work (a parameter group, a setting, a saved state)."""


def projection(seed: int, shape: tuple[int, int], rank: int, like: torch.Tensor) -> torch.Tensor:
    """The Gaussian N(0, 1/rank) projection for ``seed``, on ``like``'s device and dtype."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float32) / math.sqrt(rank)
    return p.to(device=like.device, dtype=like.dtype)


def next_seed(seed: int) -> int:
    """The seed of the next projection: the last of 15 int63 draws seeded with ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return int(torch.randint(0, _INT63, (_SEED_ADVANCE,), generator=g)[-1])


class Apollo(torch.optim.Optimizer):
    """APOLLO for groups with a ``rank`` key, AdamW for the others, in one optimizer.

    Group keys (defaults from the constructor): ``lr``, ``betas``, ``eps``, ``weight_decay``;
    low-rank groups also ``rank``, ``update_proj_gap``, ``alpha``, ``scale_type``
    ("channel" | "tensor") and ``limiter`` (None turns the norm-growth limiter off).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        update_proj_gap: int = 200,
        alpha: float = 1.0,
        scale_type: Literal["channel", "tensor"] = "channel",
        limiter: float | None = LIMITER,
        stochastic_rounding: bool = True,
    ):
        if not lr >= 0.0:
            raise OptimizerError(f"lr: {lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerError(f"betas: {betas} must both be in [0, 1)")
        if not eps >= 0.0:
            raise OptimizerError(f"eps: {eps} must be >= 0")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            update_proj_gap=update_proj_gap, alpha=alpha, scale_type=scale_type, limiter=limiter,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self._projections: dict[torch.Tensor, torch.Tensor] = {}  # a cache: rebuilt from state seeds
        position = 0
        for gi, group in enumerate(self.param_groups):
            low_rank = "rank" in group
            if low_rank:
                _check_low_rank_group(gi, group)
            for pi, p in enumerate(group["params"]):
                position += 1
                if low_rank:
                    if p.dim() != 2:
                        raise OptimizerError(
                            f"param group {gi}, parameter {pi}: shape {tuple(p.shape)}; APOLLO's "
                            "low-rank groups take 2-D weights only, put it in a group without 'rank'"
                        )
                    self.state[p]["seed"] = position

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._projections.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError("Apollo does not take sparse gradients")
                if "rank" in group:
                    self._low_rank_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _step_size(self, group: dict, step: int) -> float:
        b1, b2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - b2**step) / (1.0 - b1**step)

    def _moments(self, state: dict, r: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Update Adam's moments with ``r`` in place; return (M, sqrt(V) + eps)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(r)
            state["exp_avg_sq"] = torch.zeros_like(r)
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(r, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(r, r, value=1.0 - b2)
        return m, v.sqrt().add_(group["eps"])

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        m, denom = self._moments(state, p.grad, group)
        c = self._step_size(group, state["step"])
        self._apply(p, group, lambda w: w.addcdiv_(m, denom, value=-c))

    def _projection(self, p: torch.Tensor, group: dict, done: int) -> torch.Tensor:
        """P for the step after ``done`` completed steps: regenerated every update_proj_gap steps."""
        state = self.state[p]
        g = p.grad
        rank = min(group["rank"], min(g.shape))
        shape = (rank, g.shape[1]) if g.shape[0] >= g.shape[1] else (g.shape[0], rank)
        if done % group["update_proj_gap"] == 0:
            if done > 0:
                state["seed"] = next_seed(state["seed"])
            self._projections[p] = projection(state["seed"], shape, rank, g)
        elif p not in self._projections:  # restored from a state dict: same seed, same P
            self._projections[p] = projection(state["seed"], shape, rank, g)
        return self._projections[p]

    def _low_rank_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        g = p.grad
        done = state.get("step", 0)
        proj = self._projection(p, group, done)
        tall = g.shape[0] >= g.shape[1]
        r = g @ proj.t() if tall else proj.t() @ g
        state["step"] = done + 1
        m, denom = self._moments(state, r, group)
        r_tilde = m / denom
        # U = factor * G is never built: its norm follows from G's (channel) norms, and the
        # update is one addcmul. That saves two full-size temporaries per weight.
        if group["scale_type"] == "tensor":
            factor = r_tilde.norm() / (r.norm() + 1e-8)
            norm = factor * g.norm()
        else:  # one factor per channel: rows of a tall matrix, columns of a wide one
            dim = 1 if tall else 0
            factor = r_tilde.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
            norm = (factor * g.norm(dim=dim, keepdim=True)).norm()
        if group["limiter"] is not None:
            if "norm" in state:
                shrink = (norm / (state["norm"] + 1e-8)).clamp(min=group["limiter"]) / group["limiter"]
                factor = factor / shrink
                norm = norm / shrink
            state["norm"] = norm
        c = self._step_size(group, state["step"])
        self._apply(p, group, lambda w: w.addcmul_(g, factor * group["alpha"], value=-c))

    @staticmethod
    def _apply(p: torch.Tensor, group: dict, update) -> None:
        """W -= step (``update`` does it in place), then decoupled weight decay.

        bf16 weights are updated in float32 and rounded stochastically: an online update at
        lr ~1e-5 is far below half a bf16 ulp of a typical weight, so round-to-nearest would
        drop every one of them; stochastic rounding keeps each one in expectation.
        """
        sr = group["stochastic_rounding"] and p.dtype == torch.bfloat16
        w = p.float() if sr else p
        update(w)
        if group["weight_decay"] > 0.0:
            w.mul_(1.0 - group["lr"] * group["weight_decay"])
        if sr:
            stochastic_round_(p, w)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write float32 ``src`` into bfloat16 ``dst``, rounding up with probability equal to the
    distance to the lower bf16 neighbour: random bits in the 16 that bf16 drops, then truncate."""
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_((bits + noise).bitwise_and_(-65536).view(torch.float32))


def _check_low_rank_group(index: int, group: dict) -> None:
    if not (isinstance(group["rank"], int) and group["rank"] >= 1):
        raise OptimizerError(f"param group {index}: rank {group['rank']!r} must be an integer >= 1")
    if not (isinstance(group["update_proj_gap"], int) and group["update_proj_gap"] >= 1):
        raise OptimizerError(f"param group {index}: update_proj_gap {group['update_proj_gap']!r} must be an integer >= 1")
    if group["scale_type"] not in ("channel", "tensor"):
        raise OptimizerError(f"param group {index}: scale_type {group['scale_type']!r} must be 'channel' or 'tensor'")
    if group["limiter"] is not None and not group["limiter"] >= 1.0:
        raise OptimizerError(f"param group {index}: limiter {group['limiter']!r} must be >= 1 (or None: off)")


@dataclass(frozen=True)
class OptimizerSettings:
    """Which optimizer the trainer builds; fixed for a trainer's life (the saved state depends on it).

    ``rank``/``alpha`` default per kind: APOLLO rank DEFAULT_RANK, alpha 1; APOLLO-Mini rank 1,
    alpha sqrt(128), tensor-wise scaling. ``update_proj_gap`` 200 as in the paper.
    """

    kind: OptimizerKind = "apollo-mini"
    rank: int | None = None
    alpha: float | None = None
    update_proj_gap: int = 200
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptimizerError(f"optimizer: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise OptimizerError(f"rank: {self.rank!r} must be an integer >= 1")
        if self.kind == "apollo-mini" and self.rank not in (None, MINI_RANK):
            raise OptimizerError(f"rank: APOLLO-Mini is rank 1 by definition, got {self.rank}; use kind 'apollo'")

    def group_options(self) -> dict:
        """The keys of the low-rank param group."""
        mini = self.kind == "apollo-mini"
        return dict(
            rank=MINI_RANK if mini else (self.rank or DEFAULT_RANK),
            alpha=self.alpha if self.alpha is not None else (MINI_ALPHA if mini else 1.0),
            scale_type="tensor" if mini else "channel",
            update_proj_gap=self.update_proj_gap,
        )


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(low-rank, plain) trainable parameters, by name.

    Low-rank: the 2-D weights of the linear layers inside the decoder blocks (attention and MLP
    projections, the paper's fine-tuning targets). Plain: every other parameter that requires
    grad (norms, biases, and embeddings when they are trainable).
    """
    layers = find_layers(model)
    low_rank_ids = {
        id(m.weight) for block in layers for m in block.modules() if isinstance(m, nn.Linear)
    }
    low, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (low if id(p) in low_rank_ids and p.dim() == 2 else plain).append((name, p))
    return low, plain


def build_optimizer(model: nn.Module, settings: OptimizerSettings, lr: float = 1e-5) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer for ``model``'s trainable parameters, and their names in optimizer order.

    The names travel with the saved state (:mod:`amygdala.finetune.state`) so a restore can check it
    belongs to the same parameters. ``adamw`` is ``torch.optim.AdamW`` (the baseline).
    """
    low, plain = split_parameters(model)
    if not low and not plain:
        raise OptimizerError("the model has no parameter that requires grad; nothing to train")
    names = [n for n, _ in low] + [n for n, _ in plain]
    common = dict(lr=lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    if settings.kind == "adamw":
        return torch.optim.AdamW([p for _, p in low] + [p for _, p in plain], **common), names
    groups = []
    if low:
        groups.append({"params": [p for _, p in low], **settings.group_options()})
    if plain:
        groups.append({"params": [p for _, p in plain]})
    return Apollo(groups, **common), names


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in the optimizer's state (what a saved state and the GPU hold)."""
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
