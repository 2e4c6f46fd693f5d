"""Steering efficacy, judged by a scorer that is not our model.

A vector that means "joyful" should, added to the residual stream, make the model's text more
positive, and one that means "despairing" more negative. We generate from a fixed set of
neutral prompts without steering and steered toward each of a few strongly positive and strongly
negative concepts, and score every text with VADER (a sentiment lexicon with rules, no model:
it cannot share our model's blind spots). Reported per concept: the mean shift of VADER's
compound score and the share of prompts that moved in the intended direction.

Strength: steering that is too strong makes any text incoherent, and incoherent text scores near
0 on VADER whatever the vector means. So strengths are tried from weak to strong (as fractions
of the mean residual norm at the steered layers), and the reported one is the strongest whose
steered texts' perplexity under the unsteered model stays within ``max_perplexity_ratio`` of
the unsteered texts'. Every strength's figures are kept in the result too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from amygdala.readout import Readout, Steering, attach

#: Prompts that invite a few sentences without pulling toward any feeling.
PROMPTS = (
    "Tell me about your day.",
    "Describe the street outside your window.",
    "What did you do this morning?",
    "Write a few sentences about a walk in town.",
    "Describe your kitchen.",
    "Tell me about the last meal you cooked.",
    "What is your weekend going to look like?",
    "Write about a train journey.",
    "Describe the weather where you are.",
    "Tell me about your neighbour.",
)


@dataclass
class SteeringConfig:
    concepts_per_side: int = 3  # the most positive and most negative concepts by manifest valence
    #: strength / mean residual norm at a steered layer. The norm counts the few massive
    #: activation dimensions many models have, so fluent strengths are small fractions of it
    #: (on the default model half the norm already breaks the text).
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    max_new_tokens: int = 40
    max_perplexity_ratio: float = 2.0
    prompts: tuple[str, ...] = PROMPTS
    concepts: list[str] = field(default_factory=list)  # explicit choice; empty: by valence


def pick_concepts(readout: Readout, valence: dict[str, float], per_side: int) -> tuple[list[str], list[str]]:
    """The ``per_side`` most positive (valence > 0) and most negative (< 0) concepts of the readout."""
    rated = sorted((v, c) for c, v in valence.items() if c in readout.concepts and v is not None)
    return [c for v, c in rated[::-1] if v > 0][:per_side], [c for v, c in rated if v < 0][:per_side]


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _encode_prompts(tokenizer, prompts, device):
    rows = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        rows.append(list(ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding: generation continues every row at the same column
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _generate(model, tokenizer, readout, ids, mask, steering: Steering | None, max_new_tokens: int) -> torch.Tensor:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode(), attach(model, readout, steering=steering, record=False):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    return out[:, ids.shape[1]:]


def _texts(tokenizer, new: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _perplexity(model, tokenizer, ids, mask, new: torch.Tensor) -> float:
    """Mean per-token perplexity of the generated tokens under the unsteered model."""
    eos = tokenizer.eos_token_id
    keep = torch.ones_like(new, dtype=torch.bool)
    if eos is not None:  # tokens after the first end-of-sequence are padding
        ended = (new == eos).cumsum(1) > 0
        keep = ~ended | ((new == eos) & ((new == eos).cumsum(1) == 1))
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, keep.long()], 1)
    with torch.inference_mode():
        logits = model(input_ids=full, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), new, reduction="none")
    return math.exp(float((nll * keep).sum() / keep.sum().clamp_min(1)))


def residual_norm(model, readout: Readout, ids, mask) -> float:
    """Mean norm of the block output at the readout's layers over the prompts' tokens."""
    with torch.inference_mode():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    m = mask.bool().clone()
    m[torch.arange(len(m)), m.float().argmax(1)] = False  # each row's first token is the attention sink
    return float(torch.stack([hs[l + 1][m].norm(dim=-1).mean() for l in readout.layers]).mean())


def steering_efficacy(model, tokenizer, readout: Readout, valence: dict[str, float], cfg: SteeringConfig = SteeringConfig()) -> dict:
    """Per concept: VADER compound shift and share of prompts moved the intended way, at the
    strongest fluent strength; and the same figures at every strength tried."""
    device = next(model.parameters()).device
    ids, mask = _encode_prompts(tokenizer, cfg.prompts, device)
    vader = _vader()
    score = lambda texts: torch.tensor([vader.polarity_scores(t)["compound"] for t in texts])  # noqa: E731
    base_new = _generate(model, tokenizer, readout, ids, mask, None, cfg.max_new_tokens)
    base_texts = _texts(tokenizer, base_new)
    base_scores = score(base_texts)
    base_ppl = _perplexity(model, tokenizer, ids, mask, base_new)
    norm = residual_norm(model, readout, ids, mask)
    if cfg.concepts:
        positive = [c for c in cfg.concepts if (valence.get(c) or 0) >= 0]
        negative = [c for c in cfg.concepts if (valence.get(c) or 0) < 0]
    else:
        positive, negative = pick_concepts(readout, valence, cfg.concepts_per_side)
    sides = {c: 1 for c in positive} | {c: -1 for c in negative}
    per_strength = []
    for frac in cfg.fractions:
        strength = frac * norm
        rows = {}
        for concept, sign in sides.items():
            new = _generate(model, tokenizer, readout, ids, mask, Steering.from_concepts(readout, {concept: strength}),
                            cfg.max_new_tokens)
            texts = _texts(tokenizer, new)
            shift = score(texts) - base_scores
            rows[concept] = {
                "direction": "positive" if sign > 0 else "negative",
                "mean_shift": float(shift.mean()),
                "moved_share": float(((shift * sign) > 0).double().mean()),
                "perplexity": _perplexity(model, tokenizer, ids, mask, new),
                "example": texts[0],
            }
        fluent = all(r["perplexity"] <= cfg.max_perplexity_ratio * base_ppl for r in rows.values())
        per_strength.append({"fraction": frac, "strength": strength, "fluent": fluent, "concepts": rows})
    fluent = [s for s in per_strength if s["fluent"]]
    chosen = fluent[-1] if fluent else per_strength[0]
    intended = [r["moved_share"] for r in chosen["concepts"].values()]
    return {
        "judge": "VADER compound (vaderSentiment)",
        "prompts": list(cfg.prompts),
        "residual_norm": norm,
        "unsteered": {"mean_compound": float(base_scores.mean()), "perplexity": base_ppl, "example": base_texts[0]},
        "chosen": {"fraction": chosen["fraction"], "strength": chosen["strength"], "fluent": chosen["fluent"],
                   "mean_moved_share": sum(intended) / len(intended) if intended else None,
                   "concepts": chosen["concepts"]},
        "strengths": per_strength,
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share k/n (95% for z 1.96): honest at small n and near 0 or 1,
    where the normal approximation leaves [0, 1]."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
