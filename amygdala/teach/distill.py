"""``amygdala distill``: make a steering vector permanent by training on what it makes the model say.

"The steering vector is the prototype; training is production; test before you commit." Per
training prompt: chosen = the greedy continuation *with* the steering, rejected = the greedy
continuation without it (ORPO by default: imitate the steered text and prefer it over the
plain one). Then the question is whether the unsteered model now *is* in the steered state:

- on held-out prompts (never trained on), the readout of each steered concept over the
  unsteered greedy continuation, before and after, against the steered level before: the
  fraction of the gap training closed;
- judged from outside the readout (amygdala.teach.judge): the VADER compound of the same
  held-out continuations for valence concepts (or the report says why no outside judge
  applies), and **competence**, next-token accuracy and log-likelihood on the shipped
  ordinary texts, which the readout cannot game. The report cannot state a gap closed
  without the competence after training (``gap_closed`` raises);
- perplexity on neutral texts before and after: how much else moved.

Without prompts, the shipped varied set (seven genres) is split per genre into train and
held-out prompts, so the held-out contexts cover every genre.

Greedy decoding everywhere, so before and after differ only by the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from amygdala.teach.client import Server
from amygdala.teach.judge import Competence, OutsideJudge, outside_judge, served_competence, shipped_split, vader_compound
from amygdala.teach.runs import JobOutcome, run_jobs
from amygdala.teach.samples import Context, SampleError, TeachSample
from amygdala.teach.score import concept_means


@dataclass(frozen=True)
class DistillConfig:
    steer: dict[str, float]
    max_tokens: int = 32
    heldout: float = 0.25  # the last ceil(heldout x prompts) prompts are held out (at least one)
    objective: str = "orpo"
    learning_rate: float = 1e-5
    steps: int = 20
    submit: bool = True


class ReportError(SampleError):
    """A figure the report may not state: a gap closed without the competence after training."""


@dataclass
class Level:
    """On the held-out prompts: each concept's mean readout over the greedy continuations, their VADER compound."""

    readout: dict[str, float]
    vader: float
    texts: list[str] = field(default_factory=list)


@dataclass
class DistillReport:
    train_prompts: int
    heldout_prompts: int
    pairs: int
    identical: int  # prompts whose steered and unsteered continuations were the same (not trained on)
    before: dict[str, float]  # concept -> unsteered readout on held-out prompts
    steered: dict[str, float]
    competence_before: Competence  # required: no report without the outside competence check
    judges: dict[str, OutsideJudge]
    vader_before: float
    vader_steered: float
    after: dict[str, float] = field(default_factory=dict)
    competence_after: Competence | None = None
    vader_after: float = math.nan
    ppl_before: float | None = None
    ppl_after: float | None = None
    jobs: list[JobOutcome] = field(default_factory=list)
    samples: list[TeachSample] = field(default_factory=list)

    def gap_closed(self, concept: str) -> float:
        """The fraction of the readout gap closed; refused without the competence after training (the readout
        is what training pushed toward, so its gap alone says nothing about what else was lost)."""
        if self.competence_after is None:
            raise ReportError("distill: no competence figure after training; the gap closed is not reported without it")
        gap = self.steered[concept] - self.before[concept]
        return (self.after.get(concept, math.nan) - self.before[concept]) / gap if gap else math.nan

    def table(self) -> str:
        from amygdala.teach.runs import fmt

        lines = [f"held-out prompts: {self.heldout_prompts}; trained on {self.pairs} pairs from {self.train_prompts} prompts"
                 + (f" ({self.identical} skipped: steering did not change the greedy text)" if self.identical else ""),
                 "concept        unsteered before   steered   unsteered after   gap closed"]
        for c in self.before:
            lines.append(f"{c:<14} {fmt(self.before[c]):>16} {fmt(self.steered[c]):>9} {fmt(self.after.get(c, math.nan)):>17} "
                         f"{self.gap_closed(c):>11.0%}" if self.after else
                         f"{c:<14} {fmt(self.before[c]):>16} {fmt(self.steered[c]):>9} {'(not trained)':>17}")
        lines.append("outside the readout, on the same held-out continuations:")
        lines.append(f"  VADER compound: unsteered {self.vader_before:+.3f}, steered {self.vader_steered:+.3f}, after "
                     + ("n/a" if math.isnan(self.vader_after) else f"{self.vader_after:+.3f}"))
        lines += [f"  {c}: {j.why}" for c, j in self.judges.items()]
        lines.append(f"competence ({self.competence_before.texts} ordinary texts, {self.competence_before.tokens} "
                     f"tokens): {self.competence_before.line()} -> "
                     + (self.competence_after.line() if self.competence_after else "(not trained)"))
        if self.ppl_before is not None:
            lines.append(f"neutral perplexity: {self.ppl_before:.3f} -> "
                         f"{'n/a' if self.ppl_after is None else f'{self.ppl_after:.3f}'}")
        if self.jobs:
            lines.append("loss: " + ", ".join(f"{j.losses[0]:.4g} -> {j.losses[-1]:.4g} ({j.seconds:.1f} s)" for j in self.jobs if j.losses))
        return "\n".join(lines)


def readout_level(server: Server, encoder, prompts: Sequence[Context], concepts: Sequence[str], max_tokens: int,
                  steer: dict[str, float] | None = None) -> Level:
    """Mean over prompts of each concept's readout over the greedy continuation's tokens, and the texts' VADER."""
    names = server.manifest()["concepts"]
    gens = [server.generate(encoder.context_ids(p), max_tokens, steer=steer)[0] for p in prompts]
    per = [concept_means(g.rows, names, concepts) for g in gens]
    texts = [encoder.decode(g.token_ids) for g in gens]
    return Level({c: sum(m[c] for m in per) / len(per) for c in concepts}, vader_compound(texts), texts)


def neutral_perplexity(server: Server, encoder, texts: Sequence[str]) -> float:
    """Mean over texts of each text's perplexity (raw text, no template)."""
    ppls = [server.perplexity(list(encoder.tokenizer(t)["input_ids"])) for t in texts]
    return sum(ppls) / len(ppls)


def neutral_texts(path: Path | None = None, n: int = 16) -> list[str]:
    """Texts for the perplexity check: one per line of ``path``, or the bundled corpus's first ``n`` neutral ones."""
    if path is not None:
        try:
            texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"{path}: cannot read the neutral texts ({e})") from None
        if not texts:
            raise SampleError(f"{path}: no neutral texts; one per line")
        return texts
    from amygdala.corpus import bundled_corpus, load_corpus

    return [t.text for t in load_corpus(bundled_corpus()).neutral_texts()[:n]]


def split(prompts: Sequence[Context], heldout: float) -> tuple[list[Context], list[Context]]:
    if len(prompts) < 2:
        raise SampleError(f"prompts: {len(prompts)} prompt(s); distill needs at least 2 (some are held out)", param="prompts")
    k = min(len(prompts) - 1, max(1, math.ceil(heldout * len(prompts))))
    return list(prompts[:-k]), list(prompts[-k:])


@dataclass
class Prepared:
    """What distill measures and generates before any training: the report's before figures, the
    training pairs as ``/train`` samples, the held-out prompts. Several trainings (a sweep's, each
    rolled back) start from one of these, so each is judged on the same pairs and prompts."""

    report: DistillReport
    body: list[dict]
    held: list[Context]
    neutral: Sequence[str]
    competence_texts: Sequence[str] | None


def prepare(server: Server, encoder, prompts: Sequence[Context] | None, cfg: DistillConfig, *,
            neutral: Sequence[str] = (), competence_texts: Sequence[str] | None = None,
            progress: bool = True) -> Prepared:
    """The before figures and the training pairs (chosen: steered greedy continuation; rejected:
    unsteered), nothing trained. ``prompts`` None: the shipped set, split per genre."""
    from tqdm import tqdm

    server.check_concepts(list(cfg.steer), "--steer")
    train, held = shipped_split(cfg.heldout) if prompts is None else split(prompts, cfg.heldout)
    prompts = train + held
    concepts = list(cfg.steer)
    contexts = [encoder.context_ids(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]  # bad prompts fail first
    before = readout_level(server, encoder, held, concepts, cfg.max_tokens)
    steered = readout_level(server, encoder, held, concepts, cfg.max_tokens, cfg.steer)
    competence_before = served_competence(server, encoder, competence_texts)
    ppl_before = neutral_perplexity(server, encoder, neutral) if neutral else None
    samples, body, identical = [], [], 0
    for i, prompt in enumerate(tqdm(train, desc="generating pairs", unit="prompt", disable=not progress)):
        ids = contexts[i]
        chosen = server.generate(ids, cfg.max_tokens, steer=cfg.steer, readout=False)[0].token_ids
        rejected = server.generate(ids, cfg.max_tokens, readout=False)[0].token_ids
        if chosen == rejected or not chosen or not rejected:
            identical += 1
            continue
        samples.append(TeachSample(prompt, encoder.decode(chosen) or "?", encoder.decode(rejected) or "?",
                                   source="distill:" + ",".join(f"{c}={s:g}" for c, s in cfg.steer.items())))
        body.append({"context_ids": ids, "continuation_ids": chosen, "rejected_ids": rejected})
    report = DistillReport(len(train), len(held), len(body), identical, before.readout, steered.readout, competence_before,
                           {c: outside_judge(c) for c in concepts}, before.vader, steered.vader, ppl_before=ppl_before,
                           samples=samples)
    return Prepared(report, body, held, neutral, competence_texts)


def train_prepared(server: Server, encoder, prep: Prepared, cfg: DistillConfig, *, progress: bool = True) -> DistillReport:
    """Train on ``prep``'s pairs with ``cfg``'s objective, rate and steps (and the server's
    ``train_options``), then measure after: a new report, ``prep``'s left as it was."""
    if not prep.body:
        raise SampleError("distill: the steering changed no greedy continuation of the training prompts; "
                          "raise --steer's strength or give other prompts")
    body = [{k: v for k, v in b.items() if k != "rejected_ids"} for b in prep.body] if cfg.objective == "sft" else prep.body
    report = replace(prep.report, jobs=[])
    report.jobs = run_jobs(server, body, {"objective": cfg.objective, "learning_rate": cfg.learning_rate, "steps": cfg.steps},
                           progress=progress)
    after = readout_level(server, encoder, prep.held, list(cfg.steer), cfg.max_tokens)
    report.after, report.vader_after = after.readout, after.vader
    report.competence_after = served_competence(server, encoder, prep.competence_texts)
    report.ppl_after = neutral_perplexity(server, encoder, prep.neutral) if prep.neutral else None
    return report


def distill(server: Server, encoder, prompts: Sequence[Context] | None, cfg: DistillConfig, *,
            neutral: Sequence[str] = (), competence_texts: Sequence[str] | None = None, progress: bool = True,
            log=print) -> DistillReport:
    """:func:`prepare`, then (``cfg.submit``) :func:`train_prepared`. ``prompts`` None: the shipped
    set, split per genre; ``competence_texts`` None: the shipped ordinary texts."""
    prep = prepare(server, encoder, prompts, cfg, neutral=neutral, competence_texts=competence_texts, progress=progress)
    if not cfg.submit:
        return prep.report
    return train_prepared(server, encoder, prep, cfg, progress=progress)
