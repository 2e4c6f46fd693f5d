"""``amygdala teach``: a sample file -> training jobs on the running server, with before/after numbers.

Before and after are measured the same way on the first ``eval_samples`` samples, through the
server (so they are what the served weights do): the mean negative log-likelihood per token
of the chosen continuation (and of the rejected one, for pairs) given its context, from
vLLM's prompt log-probs; and, for ``concepts``, the readout over the greedy continuation of
each context. The job's own first and last step losses are printed too; the last one is
measured before the last update, so it is not an "after".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from amygdala.teach.client import Server
from amygdala.teach.runs import JobOutcome, fmt, run_jobs
from amygdala.teach.score import concept_means


@dataclass
class Measure:
    chosen_nll: float
    rejected_nll: float | None
    concepts: dict[str, float]


@dataclass
class TeachReport:
    samples: int
    before: Measure
    after: Measure | None = None
    jobs: list[JobOutcome] = field(default_factory=list)

    def table(self) -> str:
        rows = [("chosen NLL/token", self.before.chosen_nll, self.after and self.after.chosen_nll)]
        if self.before.rejected_nll is not None:
            rows.append(("rejected NLL/token", self.before.rejected_nll, self.after and self.after.rejected_nll))
        rows += [(f"readout {c}", v, self.after and self.after.concepts[c]) for c, v in self.before.concepts.items()]
        lines = [f"{'':<22}{'before':>10}{'after':>10}"]
        lines += [f"{name:<22}{fmt(b):>10}{fmt(a) if a is not None else 'n/a':>10}" for name, b, a in rows]
        for j in self.jobs:
            if j.losses:
                lines.append(f"job {j.job_id}: {len(j.losses)} steps in {j.seconds:.1f} s, loss {j.losses[0]:.4g} -> {j.losses[-1]:.4g}")
        return "\n".join(lines)


def _nll(server: Server, context: list[int], continuation: list[int]) -> float:
    lps = server.prompt_logprobs(context + continuation)[len(context) - 1:]
    return -sum(lps) / len(lps)


def measure(server: Server, encoded: Sequence[dict], concepts: Sequence[str], max_tokens: int) -> Measure:
    chosen = [_nll(server, s["context_ids"], s["continuation_ids"]) for s in encoded]
    rejected = [_nll(server, s["context_ids"], s["rejected_ids"]) for s in encoded if "rejected_ids" in s]
    levels: dict[str, float] = {}
    if concepts:
        names = server.manifest()["concepts"]
        per = [concept_means(server.generate(s["context_ids"], max_tokens)[0].rows, names, concepts) for s in encoded]
        levels = {c: sum(m[c] for m in per) / len(per) for c in concepts}
    return Measure(sum(chosen) / len(chosen), sum(rejected) / len(rejected) if rejected else None, levels)


def teach(server: Server, encoded: Sequence[dict], *, objective: str, learning_rate: float, steps: int,
          concepts: Sequence[str] = (), eval_samples: int = 8, max_tokens: int = 32, progress: bool = True) -> TeachReport:
    """Measure, train on ``encoded`` (``/train`` samples, from :func:`amygdala.teach.runs.encode_all`), measure."""
    if concepts:
        server.check_concepts(list(concepts), "--concept")
    probe = list(encoded[:max(1, eval_samples)])
    report = TeachReport(len(encoded), measure(server, probe, concepts, max_tokens))
    report.jobs = run_jobs(server, list(encoded), {"objective": objective, "learning_rate": learning_rate, "steps": steps},
                           progress=progress)
    report.after = measure(server, probe, concepts, max_tokens)
    return report
