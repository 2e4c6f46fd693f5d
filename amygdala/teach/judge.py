"""Judges of a distillation from outside the readout: competence, sentiment, and the shipped texts.

Why: the readout is the instrument distillation trains toward, so "closed X% of the readout
gap" alone cannot tell "joyful" from "emotional", nor a model that got worse at everything
else. These measures do not read the readout:

- **competence**: next-token accuracy (the text's token is the model's top-1 prediction) and the
  mean log-likelihood per token on a fixed set of ordinary texts shipped with the package
  (``data/competence.jsonl``: six genres, no emotion words, none in the bundled corpus). Pooled
  over every scored token; the first token of each text has no context and is not scored.
  Through the server (vLLM's ``prompt_logprobs``: each prompt token's log-prob and rank) or
  locally on a transformers model; both tokenize the raw text with the served tokenizer.
- **VADER** (``vaderSentiment``, the same lexicon judge as docs/validity.md's steering check):
  the mean compound score of the generated texts. It measures valence only, so it judges a
  concept whose valence in the bundled corpus's manifest is at least ``VALENCE_MIN`` away from
  0, in the direction of its sign; for the others (no valence, or near 0) there is no outside
  judge here and the report says so.

The shipped prompts (``data/prompts.jsonl``, seven genres) are distill's default: varied
contexts are part of the recipe, so the held-out prompts are taken from every genre.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from amygdala.teach.client import Server

DATA = Path(__file__).parent / "data"
#: |valence| below this: VADER (a valence lexicon) is no judge of the concept.
VALENCE_MIN = 0.3

#: token IDs -> per token after the first: (log-prob given the tokens before, was it the top-1 prediction)
Scorer = Callable[[list[int]], list[tuple[float, bool]]]


def _shipped(name: str, key: str) -> list[tuple[str, str]]:
    """(genre, text) per line of ``data/NAME``."""
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["genre"], r[key]) for r in rows]


def shipped_competence() -> list[tuple[str, str]]:
    return _shipped("competence.jsonl", "text")


def shipped_prompts() -> list[tuple[str, str]]:
    return _shipped("prompts.jsonl", "prompt")


def shipped_split(heldout: float) -> tuple[list[str], list[str]]:
    """The shipped prompts as (train, held out): per genre, the last ceil(heldout x its prompts) are held out."""
    by_genre: dict[str, list[str]] = {}
    for genre, prompt in shipped_prompts():
        by_genre.setdefault(genre, []).append(prompt)
    train, held = [], []
    for prompts in by_genre.values():
        k = min(len(prompts) - 1, max(1, math.ceil(heldout * len(prompts))))
        train += prompts[:-k]
        held += prompts[-k:]
    return train, held


@dataclass(frozen=True)
class Competence:
    """Pooled over ``tokens`` scored tokens of ``texts`` texts."""

    texts: int
    tokens: int
    accuracy: float  # fraction of tokens that were the model's top-1 prediction
    mean_loglik: float  # nats per token

    def line(self) -> str:
        return f"accuracy {self.accuracy:.1%}, log-lik {self.mean_loglik:.4f} nats/token"


def competence(score: Scorer, tokenize: Callable[[str], list[int]], texts: Sequence[str]) -> Competence:
    hits, total, n = 0, 0.0, 0
    for text in texts:
        for lp, top1 in score(tokenize(text)):
            hits += top1
            total += lp
            n += 1
    if not n:
        raise ValueError("competence: the texts have no token to score (each needs two tokens or more)")
    return Competence(len(texts), n, hits / n, total / n)


def served_scorer(server: Server) -> Scorer:
    """Through the running server: vLLM's prompt log-probs, rank 1 = top-1."""
    return lambda ids: [(lp, rank == 1) for lp, rank in server.prompt_token_scores(ids)]


def local_scorer(model) -> Scorer:
    """On a transformers causal LM: one forward pass per text, in float32 log-softmax."""
    import torch

    def score(ids: list[int]) -> list[tuple[float, bool]]:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:])
        lps = logp.gather(1, target[:, None])[:, 0]
        return [(float(lp), bool(hit)) for lp, hit in zip(lps, logp.argmax(-1) == target)]

    return score


def served_competence(server: Server, encoder, texts: Sequence[str] | None = None) -> Competence:
    """Competence of the served model on ``texts`` (default: the shipped set)."""
    texts = [t for _, t in shipped_competence()] if texts is None else texts
    return competence(served_scorer(server), lambda t: list(encoder.tokenizer(t)["input_ids"]), texts)


@cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> float:
    """Mean VADER compound score (-1 .. 1) of the texts."""
    return sum(_vader().polarity_scores(t)["compound"] for t in texts) / len(texts) if texts else math.nan


@dataclass(frozen=True)
class OutsideJudge:
    """What judges a concept from outside the readout: VADER with the sign it should move, or none and why."""

    concept: str
    sign: int  # +1 / -1: VADER should rise / fall; 0: no outside judge
    why: str


@cache
def _bundled_affect() -> dict:
    from amygdala.corpus import bundled_corpus, load_corpus

    return load_corpus(bundled_corpus()).affect


def outside_judge(concept: str) -> OutsideJudge:
    affect = _bundled_affect().get(concept)
    if affect is None:
        return OutsideJudge(concept, 0, "no outside judge: the bundled corpus gives it no valence, and VADER measures valence only")
    if abs(affect.valence) < VALENCE_MIN:
        return OutsideJudge(concept, 0, f"no outside judge: valence {affect.valence:+.2f} is near 0, "
                                        "and VADER measures valence only")
    return OutsideJudge(concept, 1 if affect.valence > 0 else -1,
                        f"VADER compound should {'rise' if affect.valence > 0 else 'fall'} (valence {affect.valence:+.2f})")
