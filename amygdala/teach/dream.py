"""``amygdala dream``: on-policy preference triplets from the served model's own samples.

Per prompt: ``samples`` continuations at each temperature of a sweep (streamed, with the
readout), each scored by the mean readout of the targets over its tokens (``--toward calm=1``
adds calm's score, ``--away anxious=1`` subtracts anxious's; see :mod:`.score`). The best is
chosen, the worst rejected, when their scores differ by at least ``min_gap``.

**Both directions.** A loop that only ever prefers the calmer sample trains an unconditional
habit: the model drifts calm whatever it is asked (the original system's warning). By default
each prompt therefore gives two triplets whose contexts carry a cue: after the toward cue
("Be calm.") the best sample is chosen; after the away cue ("Be anxious.", or "Be not calm.")
the same pair is mirrored. The model learns to follow the cue, not a habit. ``one_way`` writes
the toward triplet on the plain prompt only (the habit, on purpose).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from amygdala.teach.client import Server
from amygdala.teach.samples import Context, TeachSample
from amygdala.teach.score import concept_means, weighted


@dataclass(frozen=True)
class DreamConfig:
    toward: dict[str, float]
    away: dict[str, float] = field(default_factory=dict)
    samples: int = 4  # per temperature
    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    max_tokens: int = 32
    min_gap: float = 0.5
    one_way: bool = False
    cue_toward: str | None = None
    cue_away: str | None = None
    seed: int = 0

    @property
    def targets(self) -> dict[str, float]:
        out = dict(self.toward)
        for c, w in self.away.items():
            out[c] = out.get(c, 0.0) - w
        return out

    def cues(self) -> tuple[str, str]:
        toward = self.cue_toward or "Be " + " and ".join(self.toward or [f"not {c}" for c in self.away]) + "."
        away = self.cue_away or "Be " + " and ".join(self.away or [f"not {c}" for c in self.toward]) + "."
        return toward, away


@dataclass
class Triplet:
    """A prompt's best and worst sample; ``direction`` is toward, away (mirrored) or plain."""

    prompt: Context
    context: Context  # the prompt with its cue
    direction: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_score: float
    rejected_score: float
    chosen_means: dict[str, float]
    rejected_means: dict[str, float]
    temperatures: tuple[float, float]


def with_cue(prompt: Context, cue: str) -> Context:
    """The cue as a system turn before chat messages, or as a first line before text."""
    if isinstance(prompt, str):
        return f"{cue}\n{prompt}"
    return (("system", cue),) + tuple(m for m in prompt if m[0] != "system") if prompt else (("system", cue),)


@dataclass
class DreamResult:
    triplets: list[Triplet]
    prompts: int
    below_gap: int
    spread: list[float]  # per prompt: best - worst score

    def samples(self, decode) -> list[TeachSample]:
        out = []
        for t in self.triplets:
            means = t.chosen_means
            out.append(TeachSample(t.context, decode(t.chosen_ids) or "?", decode(t.rejected_ids) or "?",
                                   {c: v for c, v in means.items() if math.isfinite(v)},
                                   source=f"dream:{t.direction}:chosen {t.chosen_score:+.3f} T={t.temperatures[0]:g}, "
                                          f"rejected {t.rejected_score:+.3f} T={t.temperatures[1]:g}"))
        return out


def dream(server: Server, encoder, prompts: Sequence[Context], cfg: DreamConfig, *, progress: bool = True) -> DreamResult:
    from tqdm import tqdm

    targets = cfg.targets
    server.check_concepts(list(cfg.toward), "--toward")
    server.check_concepts(list(cfg.away), "--away")
    names = server.manifest()["concepts"]
    contexts = [encoder.context_ids(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]  # bad prompts fail first
    toward_cue, away_cue = cfg.cues()
    triplets, spread, below = [], [], 0
    bar = tqdm(total=len(prompts) * len(cfg.temperatures), desc="dreaming", unit="batch", disable=not progress)
    try:
        for i, (prompt, ids) in enumerate(zip(prompts, contexts)):
            scored = []
            for j, temp in enumerate(cfg.temperatures):
                for gen in server.stream(ids, cfg.max_tokens, temperature=temp, n=cfg.samples,
                                         seed=cfg.seed + 1000 * i + j):
                    if gen.token_ids and gen.rows:
                        means = concept_means(gen.rows, names, list(targets))
                        scored.append((weighted(means, targets), temp, gen.token_ids, means))
                bar.update(1)
            if len(scored) < 2:
                below += 1
                continue
            scored.sort(key=lambda s: s[0])
            worst, best = scored[0], scored[-1]
            spread.append(best[0] - worst[0])
            if best[0] - worst[0] < cfg.min_gap or best[2] == worst[2]:
                below += 1
                continue
            temps = (best[1], worst[1])
            if cfg.one_way:
                triplets.append(Triplet(prompt, prompt, "plain", best[2], worst[2], best[0], worst[0], best[3], worst[3], temps))
            else:
                triplets.append(Triplet(prompt, with_cue(prompt, toward_cue), "toward", best[2], worst[2], best[0], worst[0],
                                        best[3], worst[3], temps))
                triplets.append(Triplet(prompt, with_cue(prompt, away_cue), "away", worst[2], best[2], worst[0], best[0],
                                        worst[3], best[3], temps[::-1]))
    finally:
        bar.close()
    return DreamResult(triplets, len(prompts), below, spread)


def train_body(encoder, result: DreamResult, objective: str) -> list[dict]:
    """The triplets as ``/train`` samples on the exact generated token IDs."""
    out = []
    for t in result.triplets:
        sample = {"context_ids": encoder.context_ids(t.context), "continuation_ids": t.chosen_ids}
        if objective != "sft":
            sample["rejected_ids"] = t.rejected_ids
        out.append(sample)
    return out
