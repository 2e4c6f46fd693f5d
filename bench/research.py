"""The design notes' training claims as experiments on the default model (transformers, CPU).

    ./dev bench research [NAME ...] [--pairs 12] [--steps 3] [--write]
    NAME: lr-gap, preferred, onpolicy, forgetting, diversity (default: all five)

No server: the default model (SmolLM2-135M-Instruct) in float32, trained in this process with the
server's own code (``amygdala.finetune``: the objectives, APOLLO-Mini, ``run_job``), its weights
and a fresh optimizer restored before every run, so each run starts from the same model. The data
is distill's: on shipped prompts (spread over the genres), chosen = the greedy continuation with
``joyful`` steered at 0.05 x the residual norm (the demo readout), rejected = the unsteered greedy
continuation (on-policy: the model's own text). What each run is measured on:

- **KL to the start**: the mean per-token KL(start || trained) of the next-token distributions on
  held neutral texts of the bundled corpus (never trained on);
- **preferred log-lik**: the mean log-prob per token of the chosen continuations (the training pairs);
- **competence**: next-token accuracy and log-likelihood per token on the shipped ordinary texts
  (``amygdala/teach/data/competence.jsonl``), the check distill reports;
- **VADER**: the compound score of the greedy continuations of held-out prompts (an outside judge).

The experiments:

- ``lr-gap``: SFT (chosen only) and DPO (chosen vs rejected) at each ``--lrs`` rate; for each, the
  rate that reaches the same KL to the start (log-log interpolation), and their ratio. The notes'
  claim: DPO wants a ~40x lower rate than SFT (5e-7 vs 2e-5).
- ``preferred``: ORPO, DPO and DPOP at one rate; the preferred log-lik before and after (the notes:
  DPO can lower the preferred likelihood; DPOP, when it does).
- ``onpolicy``: DPO with the model's own rejected continuations against DPO with pre-collected
  ones (neutral corpus text, human-written, not this model's); the held-out VADER gap closed per
  KL (the notes: on-policy rejected samples beat pre-collected ones).
- ``forgetting``: SFT at each ``--lrs`` rate; competence and KL against the step size (the notes:
  forgetting grows with the step size).
- ``diversity``: ORPO on pairs from prompts of one genre against as many pairs spread over all
  genres; the held-out VADER gap closed (held-out prompts of every genre) and competence (the
  notes: diversity of examples keeps training coherent).

``--write`` puts each table into docs/research.md's ``bench:research-NAME`` block.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amygdala.cli.main import main as amygdala  # noqa: E402
from amygdala.finetune import JobConfig, OptimizerSettings, Sample, build_optimizer, run_job  # noqa: E402
from amygdala.finetune.objectives import continuation_logprobs, kl_to_reference, neutral_split, reference_distributions  # noqa: E402
from amygdala.models import resolve_model  # noqa: E402
from amygdala.readout import Readout, Steering, attach  # noqa: E402
from amygdala.teach.distill import neutral_texts  # noqa: E402
from amygdala.teach.judge import competence, local_scorer, shipped_competence, shipped_prompts, shipped_split, vader_compound  # noqa: E402
from amygdala.teach.tokens import Encoder  # noqa: E402
from teach import residual_norm  # noqa: E402  (bench/ is on the path when the bench runs)
from validity import publish  # noqa: E402

EXPERIMENTS = ("lr-gap", "preferred", "onpolicy", "forgetting", "diversity")
DOC = ROOT / "docs" / "research.md"
CONCEPT = "joyful"


@dataclass
class Data:
    """The model, its starting weights and everything measured on them before any training."""

    model: object
    start: dict
    encoder: Encoder
    pairs: list[Sample]  # chosen = steered, rejected = unsteered (on-policy)
    offpolicy: list[Sample]  # the same chosen, rejected = neutral corpus text
    held: list[list[int]]  # held-out prompt contexts
    readout: Readout  # the demo readout: the steering's vectors
    kl_ids: list[list[int]]  # neutral texts the KL is measured on
    narrow: list[Sample] = field(default_factory=list)  # pairs from prompts of one genre (diversity)
    kl_refs: list = field(default_factory=list)
    vader: tuple[float, float] = (math.nan, math.nan)  # held-out: unsteered, steered
    strength: float = 0.0
    base: dict = field(default_factory=dict)  # the measures before training


def spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (the shipped prompts come grouped by genre)."""
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def generate(model, enc: Encoder, contexts: list[list[int]], max_tokens: int, readout: Readout,
             steering: Steering | None) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding to reason about), cut at end of turn."""
    out = []
    eos = enc.tokenizer.eos_token_id
    with torch.inference_mode(), attach(model, readout, steering=steering, record=False):
        for ids in contexts:
            new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos)[0, len(ids):].tolist()
            out.append(new[:new.index(eos) + 1] if eos in new else new)
    return out


def make_pairs(model, enc: Encoder, contexts: list[list[int]], args, readout: Readout, steer: Steering) -> list[Sample]:
    """chosen = steered greedy, rejected = unsteered greedy; prompts where they agree are dropped."""
    chosen = generate(model, enc, contexts, args.max_tokens, readout, steer)
    rejected = generate(model, enc, contexts, args.max_tokens, readout, None)
    return [Sample(tuple(x), tuple(c), tuple(r)) for x, c, r in zip(contexts, chosen, rejected) if c and r and c != r]


def prepare(args, names: list[str]) -> Data:
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="amygdala-bench-research-"))
    try:
        if amygdala(["demo", "--out", str(work / "readout")]) != 0:
            raise SystemExit("amygdala demo failed")
        readout = Readout.load(work / "readout")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = resolve_model("default")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = Encoder.load(path)
    neutral = neutral_texts(None, 16 + args.kl_texts + args.pairs)
    strength = round(0.05 * residual_norm(model, enc.tokenizer, readout.layers, neutral[:8]), 2)  # as bench teach steers
    train, held = shipped_split(0.25)
    contexts = [enc.context_ids(p) for p in spread(train, args.pairs)]
    held_ctx = [enc.context_ids(p) for p in spread(held, args.heldout)]
    t0 = time.perf_counter()
    steer = Steering.from_concepts(readout, {CONCEPT: strength})
    pairs = make_pairs(model, enc, contexts, args, readout, steer)
    held_plain = generate(model, enc, held_ctx, args.max_tokens, readout, None)
    held_steered = generate(model, enc, held_ctx, args.max_tokens, readout, steer)
    narrow: list[Sample] = []
    if "diversity" in names:
        genre = shipped_prompts()[0][0]
        of_genre = [p for g, p in shipped_prompts() if g == genre and p in train]
        narrow = make_pairs(model, enc, [enc.context_ids(p) for p in of_genre], args, readout, steer)
    print(f"generated pairs and held-out continuations in {time.perf_counter() - t0:.0f} s", flush=True)
    precollected = neutral[16 + args.kl_texts:]
    off = [replace(p, rejected_ids=tuple(enc.continuation_ids(precollected[i])[:len(p.rejected_ids)]))
           for i, p in enumerate(pairs)]
    kl_ids = [list(enc.tokenizer(t)["input_ids"]) for t in neutral[16:16 + args.kl_texts]]
    data = Data(model, {k: v.clone() for k, v in model.state_dict().items()}, enc, pairs, off, held_ctx, readout, kl_ids,
                narrow, strength=strength)
    data.kl_refs = [reference_distributions(model, *one(ids)) for ids in kl_ids]
    data.vader = (vader_compound([enc.decode(c) for c in held_plain]), vader_compound([enc.decode(c) for c in held_steered]))
    data.base = measure(data, args)
    return data


def one(ids: list[int]) -> tuple[list, list]:
    """A neutral text as a batch of one (context, continuation): the KL at every position after the first."""
    context, continuation = neutral_split(ids)
    return [context], [continuation]


def measure(data: Data, args) -> dict:
    """KL to the start, the preferred log-lik, competence and the held-out VADER of the model as it is now."""
    model, enc = data.model, data.encoder
    with torch.no_grad():
        kl = sum(float(kl_to_reference(model, *one(ids), ref)[0]) for ids, ref in zip(data.kl_ids, data.kl_refs))
        lp = continuation_logprobs(model, [p.context_ids for p in data.pairs], [p.continuation_ids for p in data.pairs])
    comp = competence(local_scorer(model), lambda t: list(enc.tokenizer(t)["input_ids"]), [t for _, t in shipped_competence()])
    texts = [enc.decode(c) for c in generate(model, enc, data.held, args.max_tokens, data.readout, None)]
    return {"kl": kl / len(data.kl_ids), "preferred": float(lp.mean.mean()), "accuracy": comp.accuracy,
            "loglik": comp.mean_loglik, "vader": vader_compound(texts)}


def train(data: Data, args, objective: str, lr: float, samples: list[Sample] | None = None) -> dict:
    """One run from the starting weights with a fresh optimizer: its measures and loss."""
    model = data.model
    model.load_state_dict(data.start)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.weight.requires_grad_(False)  # frozen, as the server's trainer has them by default
    optimizer, _ = build_optimizer(model, OptimizerSettings())
    samples = data.pairs if samples is None else samples
    if objective == "sft":
        samples = [replace(s, rejected_ids=None) for s in samples]
    t0 = time.perf_counter()
    job = run_job(model, optimizer, samples, JobConfig(objective, lr, args.steps, micro_batch=len(samples)))
    out = measure(data, args)
    out.update(objective=objective, lr=lr, loss=(job.losses[0], job.losses[-1]), seconds=time.perf_counter() - t0)
    print(f"  {objective} lr {lr:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def header(data: Data, args, what: str) -> str:
    b = data.base
    return (f"`./dev bench research {what}` (default model, float32; {len(data.pairs)} pairs from {args.pairs} shipped "
            f"prompts, chosen = greedy with {CONCEPT} steered at {data.strength:g} (0.05 x the residual norm), rejected = "
            f"unsteered greedy, {args.max_tokens} tokens; {args.steps} steps, APOLLO-Mini, one batch; KL on "
            f"{len(data.kl_ids)} held neutral texts; competence on the shipped ordinary texts: {b['accuracy']:.2%} / "
            f"{b['loglik']:.3f} before; held-out VADER {data.vader[0]:+.3f} unsteered, {data.vader[1]:+.3f} steered "
            f"({len(data.held)} prompts); CPU):")


def interpolate(rows: list[dict], target: float) -> float:
    """The rate at which the KL reaches ``target``, log-log between the two rates around it (nan outside)."""
    pts = sorted((r["lr"], r["kl"]) for r in rows)
    for (l0, k0), (l1, k1) in zip(pts, pts[1:]):
        if min(k0, k1) <= target <= max(k0, k1) and k0 > 0 and k1 > 0 and k0 != k1:
            f = (math.log(target) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0)))
    return math.nan


def lr_gap(data: Data, args, runs: dict) -> str:
    rows = {o: [run(data, args, runs, o, lr) for lr in args.lrs] for o in ("sft", "dpo")}
    kls = [r["kl"] for rs in rows.values() for r in rs]
    target = math.sqrt(min(kls) * max(kls)) if min(kls) > 0 else math.nan  # mid-range (geometric), inside both where they overlap
    at = {o: interpolate(rs, target) for o, rs in rows.items()}
    lines = [header(data, args, "lr-gap"), "", "| rate | SFT: KL to the start | DPO: KL to the start |", "|---|---|---|"]
    lines += [f"| {lr:g} | {s['kl']:.4f} | {d['kl']:.4f} |" for lr, s, d in zip(args.lrs, rows["sft"], rows["dpo"])]
    ratio = at["sft"] / at["dpo"] if at["dpo"] == at["dpo"] and at["sft"] == at["sft"] else math.nan
    lines += ["", f"At equal KL to the start ({target:.4f} nats/token, mid-range of the runs): SFT's rate {at['sft']:.3g}, "
              f"DPO's {at['dpo']:.3g}" + (f": SFT/DPO = {ratio:.2g}x (the notes: ~40x)." if ratio == ratio else
                                          ": the two ranges of KL do not overlap there; widen --lrs.")]
    return "\n".join(lines)


def preferred(data: Data, args, runs: dict) -> str:
    b = data.base
    lines = [header(data, args, "preferred") + f" rate {args.pair_lr:g}", "",
             "| objective | preferred log-lik per token (before -> after) | KL to the start | loss |", "|---|---|---|---|"]
    for o in ("orpo", "dpo", "dpop"):
        r = run(data, args, runs, o, args.pair_lr)
        lines.append(f"| {o} | {b['preferred']:.3f} -> {r['preferred']:.3f} ({r['preferred'] - b['preferred']:+.3f}) "
                     f"| {r['kl']:.4f} | {r['loss'][0]:.3g} -> {r['loss'][1]:.3g} |")
    return "\n".join(lines)


def onpolicy(data: Data, args, runs: dict) -> str:
    b, (v0, vs) = data.base, data.vader
    lines = [header(data, args, "onpolicy") + f" DPO, rate {args.pair_lr:g}", "",
             "| rejected continuations | held-out VADER (gap closed) | KL to the start | gap closed per 0.01 KL | preferred log-lik |",
             "|---|---|---|---|---|"]
    for name, key in (("the model's own (on-policy)", "dpo"), ("neutral corpus text (pre-collected)", "dpo-off")):
        r = run(data, args, runs, key, args.pair_lr)
        gap = (r["vader"] - v0) / (vs - v0) if vs != v0 else math.nan
        lines.append(f"| {name} | {b['vader']:+.3f} -> {r['vader']:+.3f} ({gap:.0%}) | {r['kl']:.4f} "
                     f"| {gap / (r['kl'] / 0.01) if r['kl'] > 0 else math.nan:.0%} | {r['preferred']:+.3f} |")
    return "\n".join(lines)


def forgetting(data: Data, args, runs: dict) -> str:
    b = data.base
    lines = [header(data, args, "forgetting") + " SFT", "",
             "| rate | next-token accuracy | log-lik per token | KL to the start | preferred log-lik |", "|---|---|---|---|---|",
             f"| (before) | {b['accuracy']:.2%} | {b['loglik']:.3f} | 0 | {b['preferred']:.3f} |"]
    for lr in args.lrs:
        r = run(data, args, runs, "sft", lr)
        lines.append(f"| {lr:g} | {r['accuracy']:.2%} ({r['accuracy'] - b['accuracy']:+.2%}) | {r['loglik']:.3f} "
                     f"({r['loglik'] - b['loglik']:+.3f}) | {r['kl']:.4f} | {r['preferred']:.3f} |")
    return "\n".join(lines)


def diversity(data: Data, args, runs: dict) -> str:
    n = min(len(data.narrow), len(data.pairs))
    genre = shipped_prompts()[0][0]
    b, (v0, vs) = data.base, data.vader
    lines = [header(data, args, "diversity") + f" ORPO, rate {args.pair_lr:g}, {n} pairs each", "",
             "| training prompts | held-out VADER (gap closed) | next-token accuracy | log-lik per token | KL to the start |",
             "|---|---|---|---|---|"]
    for name, samples in ((f"one genre ({genre})", data.narrow[:n]), ("spread over the 7 genres", spread(data.pairs, n))):
        r = run(data, args, runs, f"orpo-{name}", args.pair_lr, samples)
        gap = (r["vader"] - v0) / (vs - v0) if vs != v0 else math.nan
        lines.append(f"| {name} | {b['vader']:+.3f} -> {r['vader']:+.3f} ({gap:.0%}) | {r['accuracy']:.2%} "
                     f"({r['accuracy'] - b['accuracy']:+.2%}) | {r['loglik']:.3f} ({r['loglik'] - b['loglik']:+.3f}) "
                     f"| {r['kl']:.4f} |")
    return "\n".join(lines)


def run(data: Data, args, runs: dict, key: str, lr: float, samples: list[Sample] | None = None) -> dict:
    """A run, once per process (lr-gap and forgetting share the SFT runs, preferred and onpolicy the DPO one).
    ``key``: the objective, or a name for a run on other ``samples`` (its objective before the first "-")."""
    if (key, lr) not in runs:
        objective = key.split("-")[0]
        runs[key, lr] = train(data, args, objective, lr, data.offpolicy if key == "dpo-off" else samples)
    return runs[key, lr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"experiments ({', '.join(EXPERIMENTS)}; default: all)")
    ap.add_argument("--pairs", type=int, default=12, help="training prompts (spread over the shipped genres)")
    ap.add_argument("--heldout", type=int, default=7, help="held-out prompts for VADER")
    ap.add_argument("--kl-texts", type=int, default=8, help="held neutral texts the KL is measured on")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lrs", default="3e-6,1e-5,3e-5,1e-4", help="lr-gap, forgetting: the rates tried")
    ap.add_argument("--pair-lr", type=float, default=3e-5, help="preferred, onpolicy: the rate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="write the tables into docs/research.md")
    args = ap.parse_args()
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    names = args.names or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        ap.error(f"unknown experiment {unknown[0]!r}; one of {', '.join(EXPERIMENTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = prepare(args, names)
    print(f"{len(data.pairs)} pairs; before: " + ", ".join(f"{k} {v:.4g}" for k, v in data.base.items() if isinstance(v, float)),
          flush=True)
    runs: dict = {}
    fns = {"lr-gap": lr_gap, "preferred": preferred, "onpolicy": onpolicy, "forgetting": forgetting, "diversity": diversity}
    for name in names:
        publish(DOC, f"research-{name}", fns[name](data, args, runs), args.write)
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
