"""Training objectives on token IDs: SFT, ORPO, DPO and DPOP, with the loss on continuation tokens only.

Each objective gives one loss per sample; a job averages them over its samples. All three
need the same quantity, log p(continuation | context) summed over the continuation's tokens,
which :func:`continuation_logprobs` computes with the logits of the last positions only (the
full [batch, length, vocab] logits of a long context would dwarf the model's activations).

- **SFT**: the mean negative log-likelihood of the sample's continuation tokens.
- **ORPO** (Hong et al., 2024): SFT on the preferred continuation plus ``lambda`` times
  -log sigmoid(log odds(preferred) - log odds(rejected)), where odds(y) = p / (1 - p) with p
  the per-token mean likelihood exp(mean log p). It needs no reference model: a small penalty
  on the disfavoured answer during SFT.
- **DPO** (Rafailov et al., 2023): -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
  (log pi(y_l) - log ref(y_l)))) with summed log-probs. The reference is the weights as they
  were when the job started: its log-probs are computed once, before the first update
  (:func:`reference_logprobs`), so no second copy of the model is ever needed. Each job thus
  starts from a loss of log 2 and anchors to the model it found (iterated DPO); a long job
  still cannot drift far from where it began.
- **DPOP** (DPO-Positive, Pal et al., 2024): DPO plus ``dpop_lambda`` times max(0, log ref(y_w) -
  log pi(y_w)) (summed log-probs). DPO only asks the margin to grow, and can get it by lowering
  both likelihoods; the penalty forbids the preferred one from falling below where it started.

**Anchor** (any objective, ``anchor`` > 0): ``anchor`` times the mean KL(ref || pi) of the
next-token distributions at the positions that predict the job's own continuation tokens, plus
the same on the request's held ``neutral`` sequences (every position). Why: the objectives pull
only the continuation tokens' probabilities; the KL term is what keeps the rest of each
distribution, and untouched text, where the job found it ("small steps near the current
solution"). The reference distributions are the job's starting weights, computed once before the
first update (:func:`reference_distributions`) and kept as float32 log-probs, positions x vocab
(their memory is budgeted: :func:`amygdala.finetune.memory.reference_bytes`), so no second copy
of the model is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amygdala.finetune.inputs import JobConfig, Sample


@dataclass
class LogProbs:
    """Per sample: summed log-prob of the continuation, and its token count."""

    total: torch.Tensor  # [batch] float32
    tokens: torch.Tensor  # [batch] float32

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens


def continuation_logprobs(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> LogProbs:
    """log p(continuation | context) of each pair, under ``model`` (grad flows when enabled)."""
    logp, target, on = _distributions(model, contexts, continuations)
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~on, 0.0)
    return LogProbs(picked.sum(1), on.sum(1).float())


def _distributions(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probs [batch, positions, vocab] at the positions that predict each
    continuation's tokens, with those tokens and the mask of real positions.

    Sequences are left-padded so every continuation ends at the last position; positions are
    counted from each sequence's first real token, so padding changes nothing.
    """
    device = next(model.parameters()).device
    seqs = [list(c) + list(y) for c, y in zip(contexts, continuations)]
    width = max(map(len, seqs))
    keep = max(map(len, continuations)) + 1  # the positions that predict continuation tokens
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    target = torch.zeros(len(seqs), keep - 1, dtype=torch.long)
    on = torch.zeros(len(seqs), keep - 1, dtype=torch.bool)
    for i, (seq, y) in enumerate(zip(seqs, continuations)):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        target[i, keep - 1 - len(y):] = torch.tensor(list(y))
        on[i, keep - 1 - len(y):] = True
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    ids, mask, positions, target, on = (t.to(device) for t in (ids, mask, positions, target, on))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1), target, on


def sft_loss(model, samples: Sequence[Sample]) -> torch.Tensor:
    lp = continuation_logprobs(model, [s.context_ids for s in samples], [s.continuation_ids for s in samples])
    return -lp.mean


def _pair(model, samples: Sequence[Sample]) -> tuple[LogProbs, LogProbs]:
    """Preferred and rejected log-probs in one forward (2x batch)."""
    n = len(samples)
    lp = continuation_logprobs(
        model, [s.context_ids for s in samples] * 2,
        [s.continuation_ids for s in samples] + [s.rejected_ids for s in samples],
    )
    return LogProbs(lp.total[:n], lp.tokens[:n]), LogProbs(lp.total[n:], lp.tokens[n:])


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp), stable as p -> 1."""
    m = mean_logp.clamp(max=-1e-6)
    return m - torch.log(-torch.expm1(m))


def orpo_loss(model, samples: Sequence[Sample], lam: float) -> torch.Tensor:
    chosen, rejected = _pair(model, samples)
    ratio = F.logsigmoid(_log_odds(chosen.mean) - _log_odds(rejected.mean))
    return -chosen.mean - lam * ratio


@torch.no_grad()
def reference_logprobs(model, samples: Sequence[Sample], micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's reference: summed log-probs of preferred and rejected under the current weights."""
    chosen, rejected = [], []
    for b in range(0, len(samples), micro_batch):
        c, r = _pair(model, samples[b : b + micro_batch])
        chosen.append(c.total)
        rejected.append(r.total)
    return torch.cat(chosen), torch.cat(rejected)


def dpo_loss(model, samples: Sequence[Sample], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    chosen, rejected = _pair(model, samples)
    margin = (chosen.total - ref_chosen) - (rejected.total - ref_rejected)
    return -F.logsigmoid(beta * margin)


def dpop_loss(model, samples: Sequence[Sample], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
              lam: float) -> torch.Tensor:
    chosen, rejected = _pair(model, samples)
    margin = (chosen.total - ref_chosen) - (rejected.total - ref_rejected)
    return -F.logsigmoid(beta * margin) + lam * (ref_chosen - chosen.total).clamp_min(0.0)


@dataclass
class Reference:
    """One micro-batch's fixed reference: the log-probs [rows, positions, vocab] of the
    starting weights and the mask of the positions that count."""

    logp: torch.Tensor
    on: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.logp.numel() * self.logp.element_size()


@torch.no_grad()
def reference_distributions(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> Reference:
    """The anchor's reference for one micro-batch, under the current (the job's starting) weights."""
    logp, _, on = _distributions(model, contexts, continuations)
    return Reference(logp, on)


def kl_to_reference(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                    reference: Reference) -> torch.Tensor:
    """Per sequence: the mean over its positions of KL(ref || pi) of the next-token distributions."""
    logp, _, on = _distributions(model, contexts, continuations)
    ref = reference.logp
    kl = (ref.exp() * (ref - logp)).sum(-1).masked_fill(~on, 0.0)
    return kl.sum(1) / on.sum(1).clamp_min(1)


def neutral_split(ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A neutral sequence as (context, continuation): the KL is taken at every position after the first."""
    return tuple(ids[:1]), tuple(ids[1:])


def sample_losses(model, samples: Sequence[Sample], config: JobConfig, reference: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Per-sample losses of ``config.objective`` (``reference``: this micro-batch's DPO/DPOP reference)."""
    if config.objective == "sft":
        return sft_loss(model, samples)
    if config.objective == "orpo":
        return orpo_loss(model, samples, config.orpo_lambda)
    if reference is None:
        raise ValueError(f"{config.objective} needs the reference log-probs of reference_logprobs()")
    if config.objective == "dpop":
        return dpop_loss(model, samples, reference[0], reference[1], config.beta, config.dpop_lambda)
    return dpo_loss(model, samples, reference[0], reference[1], config.beta)
