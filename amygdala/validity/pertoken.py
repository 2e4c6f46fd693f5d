"""The per-token view on held-out stories: what a person watching the page sees, measured.

Stories are the held-out unit (fold k holds out every concept's k-th scene text, as
:mod:`amygdala.quality.heldout`). One forward keeps each story's per-token activations (the
first sequence position, the attention sink, left out as pooling leaves it out) and the
per-layer token moments of the stories and the neutral texts. Per fold nothing runs forward
again: the vectors are refit from the pooled rows without the held-out stories, and the
statistics come in closed form from the moments (mean_c = v_c . mu, s_c^2 = v_c^T S v_c), with
the held-out stories' tokens subtracted from the emotional-text moments.

Variants, side by side: the vectors as built or with what all concepts share removed
(:func:`amygdala.readout.construction.remove_shared`), z-scored against neutral text (today's
page) or against emotional text (the stories).

Figures: per-token cluster top-1 (with chance: the true cluster's share of concepts); story
cluster top-1 from the per-token readout averaged over the story (which equals the z of its
mean-pooled row); the share of all token argmaxes taken by the three most frequent concepts
(uniform 3/n); and the AUC of a valence colour for positive- vs negative-valence stories.
"""

from __future__ import annotations

from collections import Counter

import torch

from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.corpus.loader import PAIRED, STORY
from amygdala.methods import ConceptSets, compute_vectors
from amygdala.validity.heldout import folds
from amygdala.readout.construction import TokenMoments, remove_shared, valence_direction

VARIANTS = ("as_built/neutral", "as_built/emotional", "mean_removed/neutral", "mean_removed/emotional")
#: The readout today's page shows (vectors as built, neutral-text statistics).
OLD = "as_built/neutral"


def content_tokens(matrix: torch.Tensor, start: int) -> torch.Tensor:
    """A text's content-token rows without sequence position 0 (the attention sink), unless
    that is all there is: the same tokens mean pooling averages."""
    return matrix[1:] if start == 0 and matrix.shape[0] > 1 else matrix


class StoryTokens:
    """Per-token activations of chosen rows (the stories), and token moments per layer of those
    rows and of the neutral rows, filled by :func:`amygdala.activations.collect`'s ``on_tokens``."""

    def __init__(self, stories: set[int], neutral: set[int], layers: list[int], moment_rows: set[int] | None = None):
        # ``stories``: rows whose tokens are kept (the held-out ones); ``moment_rows``: rows whose
        # tokens make the emotional-text moments (default: the same rows).
        self.stories, self.neutral = stories, neutral
        self.moment_rows = stories if moment_rows is None else moment_rows
        self.tokens: dict[int, dict[int, torch.Tensor]] = {l: {} for l in layers}
        self.story_moments: dict[int, TokenMoments] = {}  # made at the first token: the hidden size comes with it
        self.neutral_moments: dict[int, TokenMoments] = {}

    def add(self, row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        if row not in self.stories and row not in self.neutral and row not in self.moment_rows:
            return
        # Half precision halves the ~1 GB of kept tokens on the default model; the moments take the
        # same rounded values, so subtracting a held-out story's tokens later removes them exactly.
        x = content_tokens(matrix, start).cpu().half().float()
        if row in self.stories:
            self.tokens[layer][row] = x.half()
        if row in self.moment_rows:
            self.story_moments.setdefault(layer, TokenMoments(x.shape[1])).add(x)
        if row in self.neutral:
            self.neutral_moments.setdefault(layer, TokenMoments(x.shape[1])).add(x)


# ---- metrics (pure; tests check them on hand-computed cases) ----

def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half);
    None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def top_share(argmaxes: Counter, k: int = 3) -> float:
    """The share of all argmaxes taken by the ``k`` most frequent concepts."""
    total = sum(argmaxes.values())
    return sum(n for _, n in argmaxes.most_common(k)) / total if total else 0.0


def causal_smooth(z: torch.Tensor, n: int) -> torch.Tensor:
    """[T, C] -> the mean over the last ``n`` tokens at each token (fewer at the start)."""
    if n <= 1:
        return z
    c = torch.cat([torch.zeros_like(z[:1]), z.cumsum(0)])
    t = torch.arange(1, z.shape[0] + 1)
    lo = (t - n).clamp_min(0)
    return (c[t] - c[lo]) / (t - lo).unsqueeze(1).to(z)


def valence_weights(valence: list[float | None]) -> torch.Tensor:
    """The page's colour weights (view/assets/app.js valenceWeights): each concept's valence
    minus the mean of the known ones, 0 where unknown; scaled so sum |w| = 1."""
    known = [v for v in valence if v is not None]
    mean = sum(known) / len(known) if known else 0.0
    w = torch.tensor([0.0 if v is None else v - mean for v in valence])
    return w / w.abs().sum().clamp_min(1e-12)


class Tally:
    """The figures of one variant, accumulated story by story."""

    def __init__(self, clusters: list[str], smooth: tuple[int, ...]):
        self.clusters = clusters
        self.size = Counter(clusters)
        self.smooth = smooth
        self.tokens = self.stories = self.story_hit = 0
        self.story_chance = 0.0
        self.token_hit = Counter()  # per smoothing window
        self.token_chance = 0.0
        self.argmax: Counter = Counter()
        self.colour: list[float] = []
        self.label: list[bool] = []

    def add(self, true: int, z: torch.Tensor, colour: torch.Tensor | None = None, positive: bool | None = None) -> None:
        """One held-out story: ``z`` [T, C] per-token z-scores (layers averaged), ``colour`` [T]
        the page's valence per token, ``positive`` the story's valence sign (None: unrated)."""
        cl = self.clusters
        for n in self.smooth:
            pred = causal_smooth(z, n).argmax(1).tolist()
            self.token_hit[n] += sum(cl[p] == cl[true] for p in pred)
        pred = z.argmax(1).tolist()
        self.argmax.update(pred)
        self.tokens += len(pred)
        self.token_chance += len(pred) * self.size[cl[true]] / len(cl)
        self.stories += 1
        self.story_hit += cl[int(z.mean(0).argmax())] == cl[true]
        self.story_chance += self.size[cl[true]] / len(cl)
        if colour is not None and positive is not None:
            self.colour.append(float(colour.mean()))
            self.label.append(positive)

    def result(self, concepts: list[str]) -> dict:
        n = max(self.tokens, 1)
        return {
            "token_cluster_top1": self.token_hit[1] / n,
            "story_cluster_top1": self.story_hit / max(self.stories, 1),
            "top3_share": top_share(self.argmax),
            "top3": [concepts[i] for i, _ in self.argmax.most_common(3)],
            "valence_auc": auc(self.colour, self.label),
            "smoothed_token_cluster_top1": {str(k): self.token_hit[k] / n for k in self.smooth if k > 1},
            "chance_token_cluster_top1": self.token_chance / n,
            "chance_story_cluster_top1": self.story_chance / max(self.stories, 1),
        }


def _zscore(x: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x @ v.T - mean.float()) / std.float().clamp_min(1e-6)


def fold_valence_direction(
    pooled: torch.Tensor, pos_rows: list[torch.Tensor], valence: list[float | None],
) -> torch.Tensor | None:
    """The build's valence track fitted inside the fold (:func:`valence_direction` of the
    positive-valence concepts' training positives against the negative-valence ones', a text of
    both signs left out as the build leaves it out); None when the corpus rates no concepts of
    one sign."""
    up = {int(r) for rows, v in zip(pos_rows, valence) if v is not None and v > 0 for r in rows}
    down = {int(r) for rows, v in zip(pos_rows, valence) if v is not None and v < 0 for r in rows}
    up, down = up - down, down - up
    if not up or not down:
        return None
    return valence_direction(pooled, sorted(up), sorted(down))


def per_token(
    corpus: Corpus, acts: Activations, tokens: StoryTokens, method: str = "diffmean", *,
    max_folds: int | None = None, smooth: tuple[int, ...] = (1, 4, 8), **params,
) -> dict:
    """The per-token figures of every variant on held-out stories (see the module docstring),
    from one forward's pooled rows (``acts``) and story tokens (``tokens``); ``"all"`` layers
    averaged as the page averages them."""
    concepts = list(corpus.concepts)
    index = {c: i for i, c in enumerate(concepts)}
    clusters = corpus.cluster_of()
    valence = corpus.valence()
    weights = valence_weights(valence)
    pos_all = [set(acts.rows([t.text for t in corpus.positives(c)])) for c in concepts]
    neutral = torch.tensor(sorted(set(acts.rows([t.text for t in corpus.neutral_texts()]))), dtype=torch.long)
    every = set(acts.rows(corpus.text_list()))
    tallies = {name: Tally(clusters, smooth) for name in VARIANTS}
    direction = Tally(clusters, (1,))  # only its colour list is used: the fold-fitted valence direction
    for fold in folds(corpus, max_folds):
        held = {acts.row[t]: c for c, t in fold.items() if acts.row[t] in tokens.tokens[acts.layers[0]]}
        if not held:
            continue
        train_rows = every - set(held)
        pos_rows = [torch.tensor(sorted(p - set(held)), dtype=torch.long) for p in pos_all]
        sets = ConceptSets(concepts, pos_rows, [torch.tensor(sorted(train_rows - p), dtype=torch.long) for p in pos_all],
                           neutral)
        built = compute_vectors(method, acts, sets, **params)
        z = {name: {row: 0.0 for row in held} for name in VARIANTS}
        dz = {row: 0.0 for row in held}
        for layer, v_old in built.items():
            v_new, _emotionality = remove_shared(v_old)
            gone = TokenMoments(v_old.shape[1])
            for row in held:
                gone.add(tokens.tokens[layer][row].float())
            emotional = tokens.story_moments[layer].subtract(gone)
            # A corpus without neutral texts: its stories stand in (the build does the same, with a warning).
            stats = {"neutral": tokens.neutral_moments.get(layer, tokens.story_moments[layer]), "emotional": emotional}
            d = fold_valence_direction(acts.pooled[layer], pos_rows, valence)
            for name in VARIANTS:
                construction, statistics = name.split("/")
                v = v_old if construction == "as_built" else v_new
                mean, std = stats[statistics].mean_std(v)
                for row in held:
                    z[name][row] = z[name][row] + _zscore(tokens.tokens[layer][row].float(), v, mean, std) / len(built)
            if d is not None:
                dm, ds = stats["neutral"].mean_std(d)
                for row in held:
                    dz[row] = dz[row] + _zscore(tokens.tokens[layer][row].float(), d.unsqueeze(0), dm, ds)[:, 0] / len(built)
        for row, concept in held.items():
            i = index[concept]
            sign = None if valence[i] is None or valence[i] == 0 else valence[i] > 0
            for name in VARIANTS:
                zz = z[name][row]
                tallies[name].add(i, zz, zz @ weights, sign)
            if sign is not None and isinstance(dz[row], torch.Tensor):
                direction.colour.append(float(dz[row].mean()))
                direction.label.append(sign)
    results = {name: t.result(concepts) for name, t in tallies.items()}
    first = tallies[OLD]
    return {
        "method": method,
        "layers": "z averaged over the readout's layers, as the page does",
        "stories": first.stories,
        "tokens": first.tokens,
        "chance": {"token_cluster_top1": first.token_chance / max(first.tokens, 1),
                   "story_cluster_top1": first.story_chance / max(first.stories, 1),
                   "top3_share": 3 / len(concepts)},
        "variants": results,
        "valence_direction": {"auc": auc(direction.colour, direction.label),
                              "source": "the build's valence track fitted inside each fold (logistic regression of positive- "
                                        "against negative-valence concepts' training texts), z on neutral text"},
        "old": OLD,
    }


def story_tokens_for(corpus: Corpus, texts: list[str], layers: list[int], max_folds: int | None = None) -> StoryTokens:
    """A :class:`StoryTokens` for ``texts`` (collect's distinct rows, in order) that keeps the
    tokens of the stories the folds hold out and the moments of every story and neutral text."""
    row = {t: i for i, t in enumerate(texts)}
    held = {row[t] for fold in folds(corpus, max_folds) for t in fold.values()}
    scenes = {row[t.text] for c in corpus.concepts for t in corpus.positives(c) if t.kind in (STORY, PAIRED)}
    neutral = {row[t.text] for t in corpus.neutral_texts()}
    return StoryTokens(held, neutral, layers, moment_rows=scenes | held)


#: The issue's targets for the per-token view on the default model (docs/validity.md).
TARGETS = {"token_cluster_top1": ">= 30%", "story_cluster_top1": ">= 50%", "top3_share": "<= 10%", "valence_auc": ">= 0.85"}


def _f(x, pct: bool = True) -> str:
    return "-" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.2f}")


def rows(pt: dict) -> list[list[str]]:
    """The per-token table: a header, one row per variant, the chance row and the targets."""
    smooth = sorted({k for r in pt["variants"].values() for k in r["smoothed_token_cluster_top1"]}, key=int)
    head = ["vectors/statistics", "token cluster top-1", *[f"smoothed {k}" for k in smooth], "story cluster top-1",
            "top-3 share", "valence-colour AUC", "top-3 concepts"]
    out = [head]
    for name, r in pt["variants"].items():
        out.append([name + (" (today)" if name == pt["old"] else ""), _f(r["token_cluster_top1"]),
                    *[_f(r["smoothed_token_cluster_top1"][k]) for k in smooth], _f(r["story_cluster_top1"]),
                    _f(r["top3_share"]), _f(r["valence_auc"], False), ", ".join(r["top3"])])
    c = pt["chance"]
    out.append(["chance / uniform", _f(c["token_cluster_top1"]), *["" for _ in smooth], _f(c["story_cluster_top1"]),
                _f(c["top3_share"]), "0.50", ""])
    out.append(["target", TARGETS["token_cluster_top1"], *["" for _ in smooth], TARGETS["story_cluster_top1"],
                TARGETS["top3_share"], TARGETS["valence_auc"], ""])
    out.append(["valence track (the page's colour)", "", *["" for _ in smooth], "", "", _f(pt["valence_direction"]["auc"], False), ""])
    return out


def table(pt: dict) -> str:
    r = rows(pt)
    width = [max(len(x[i]) for x in r) for i in range(len(r[0]))]
    lines = [f"per-token view on {pt['stories']} held-out stories, {pt['tokens']} tokens ({pt['layers']})"]
    lines += ["  ".join(x[i].ljust(width[i]) for i in range(len(x))).rstrip() for x in r]
    lines.append(f"valence track (the page's colour): {pt['valence_direction']['source']}")
    return "\n".join(lines)


def markdown(pt: dict) -> str:
    r = rows(pt)
    md = ["| " + " | ".join(r[0]) + " |", "|" + "---|" * len(r[0])]
    md += ["| " + " | ".join(x) + " |" for x in r[1:]]
    return "\n".join(md)


def html(pt: dict) -> str:
    from html import escape

    r = rows(pt)
    head = "".join(f"<th>{escape(x)}</th>" for x in r[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>" for row in r[1:])
    return (f"<h3 id=\"per-token\">Per-token view on held-out stories</h3><p>{pt['stories']} stories, {pt['tokens']} "
            f"tokens, z averaged over the layers; the first position (attention sink) left out. Valence direction: "
            f"{escape(pt['valence_direction']['source'])}.</p><table><tr>{head}</tr>{body}</table>")
