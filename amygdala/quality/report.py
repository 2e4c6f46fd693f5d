"""quality.json: every metric per concept and layer, the cluster and geometry summaries, triage.

:func:`compute` takes :class:`QualityInputs` (tensors, no model) so the whole report can be
built from synthetic activations in tests and benches; :mod:`amygdala.quality.run` fills the
inputs from a model run. The schema is documented in docs/quality.md; bump
``SCHEMA_VERSION`` when a field changes meaning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from amygdala import __version__
from amygdala.methods import ConceptSets
from amygdala.quality import metrics
from amygdala.quality.config import QualityConfig

SCHEMA_VERSION = 1

#: Triage buckets in display order, with the next action for each (printed and in the HTML).
ACTIONS = {
    "fragmented": "read its outlying texts; add paired scenarios that hold the setting fixed",
    "redundant": "merge it with its top coefficients, or add pairs that vary only this concept",
    "wrong_cluster": "check its manifest cluster; if right, add texts that separate it from the nearer one",
    "mixed": "add texts in new settings to sharpen it",
    "clean": "nothing to do",
}

#: What each bucket means, for the HTML report.
MEANING = {
    "fragmented": "its texts' offsets from the negatives do not share one direction (low first PC)",
    "redundant": "a ridge fit on the other concept vectors rebuilds its vector (high R^2)",
    "wrong_cluster": "its vector is nearer another cluster's centroid than its own cluster's",
    "mixed": "first PC between the two thresholds, no other problem",
    "clean": "one dominant direction, not rebuilt by its peers, in its own cluster",
}


@dataclass
class QualityInputs:
    """Everything the report reads. Site tensors are keyed by layer and may be missing for a
    layer (hybrid layer without attention, MoE without a single down projection): those are
    listed in ``skipped`` with the reason."""

    concepts: list[str]
    clusters: list[str]  # manifest cluster of each concept
    layers: list[int]
    vectors: dict[int, torch.Tensor]  # [C, hidden]
    pooled: dict[int, torch.Tensor]  # [n_texts, hidden]
    sets: ConceptSets
    text_names: list[str]  # where each pooled row comes from, e.g. stories/calm.txt:7
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # attention out-proj input
    n_heads: int = 0
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # MLP down-proj input
    down: dict[int, torch.Tensor] = field(default_factory=dict)  # down weight [hidden, neurons]
    eigvals: dict[int, torch.Tensor] = field(default_factory=dict)  # subspace [C, k]
    skipped: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _r(x, digits: int = 4) -> float | None:
    """A json number: rounded (the file stays small and diffable), NaN as null."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def _cluster_order(clusters: list[str]) -> list[str]:
    return list(dict.fromkeys(clusters))


def _neuron_entry(i: int, best_idx, best_cos, contrib, cfg: QualityConfig) -> dict:
    """Concept ``i``'s alignment with single MLP neurons and their summed contribution."""
    top = contrib[i].abs().topk(min(cfg.top_neurons, contrib.shape[1])).indices
    return {
        "neuron": int(best_idx[i]),
        "cos": _r(best_cos[i]),
        "single_neuron": bool(abs(best_cos[i]) > cfg.single_neuron_cos),
        "mlp_total": _r(contrib[i].sum()),
        "top_contributions": [[int(j), _r(contrib[i, j])] for j in top.tolist()],
    }


def _head_entry(norms: torch.Tensor, sel: torch.Tensor, n_heads: int, cfg: QualityConfig) -> dict:
    """One concept's per-head norms and selectivity, and how concentrated they are."""
    k = cfg.head_k(n_heads)
    top = norms.topk(min(cfg.top_heads, n_heads)).indices.tolist()
    return {
        "top": [[h, _r(norms[h]), _r(sel[h])] for h in top],
        "head_concentration": _r(metrics.concentration(norms, k)),
        "k": k,
        "even": _r(k / n_heads),
    }


def _layer_summary(concepts: list[str], names: list[str], cos, coh, ratio, scores, cfg: QualityConfig) -> dict:
    """The layer-wide part: the concept map's geometry and each cluster's cohesion."""
    def loaders(col: torch.Tensor) -> dict:
        n = max(1, min(cfg.loaders, len(concepts) // 2))  # the two poles never share a concept
        hi = col.topk(n).indices.tolist()
        lo = (-col).topk(n).indices.tolist()
        return {"positive": [[concepts[j], _r(col[j])] for j in hi], "negative": [[concepts[j], _r(col[j])] for j in lo]}

    return {
        "geometry": {
            "explained_variance": [_r(r) for r in ratio.tolist()],
            "two_pc_share": _r(ratio[:2].sum()),
            "pc1": loaders(scores[:, 0]),
            "pc2": loaders(scores[:, 1]),
            "map": [[_r(a, 3), _r(b, 3)] for a, b in scores.tolist()],
        },
        "cohesion": {names[k]: _r(coh[k]) for k in range(len(names))},
        "cosine": cos,  # kept in memory for the heatmap, dropped from the json
    }


def _layer_metrics(
    inp: QualityInputs, layer: int, cfg: QualityConfig, names: list[str], labels: torch.Tensor,
    pos_member: torch.Tensor, neg_member: torch.Tensor,
) -> dict:
    """Per concept (list, manifest order) plus the layer-wide summaries of one layer."""
    concepts = inp.concepts
    v = metrics.unit_rows(inp.vectors[layer].double())
    cos = v @ v.T
    near_idx, near_cos = metrics.nearest_concepts(cos, cfg.nearest_k)
    r2, coef = metrics.ridge_redundancy(v, cfg.ridge_lambda)
    sim = metrics.cluster_similarity(cos, labels, len(names))
    x = inp.pooled[layer]
    neg_mean = metrics.group_means(x, neg_member)
    heads = inp.heads.get(layer)
    if heads is not None:
        head_norms, head_sel = metrics.head_stats(heads, pos_member, neg_member, inp.n_heads)
    neurons, down = inp.neurons.get(layer), inp.down.get(layer)
    with_neurons = neurons is not None and down is not None
    if with_neurons:
        best_idx, best_cos = metrics.neuron_alignment(v, down)
        act_diff = metrics.group_means(neurons, pos_member) - metrics.group_means(neurons, neg_member)
        contrib = metrics.neuron_contributions(v, down, act_diff)
    eig = inp.eigvals.get(layer)

    per = []
    for i, c in enumerate(concepts):
        pos = inp.sets.positives[i]
        pc, align = metrics.first_pc(x[pos], neg_mean[i], v[i])
        order = align.argsort()
        m = {
            "first_pc_variance_ratio": _r(pc),
            "alignment": [[inp.text_names[int(r)], _r(a)] for r, a in zip(pos.tolist(), align.tolist())],
            "outliers": [inp.text_names[int(pos[j])] for j in order[: cfg.outliers].tolist()],
            "nearest_concepts": [[concepts[j], _r(s)] for j, s in zip(near_idx[i].tolist(), near_cos[i].tolist())],
            "redundancy": {
                "r2": _r(r2[i]),
                "top": [[concepts[j], _r(coef[i, j])] for j in coef[i].abs().topk(min(cfg.coef_k, len(concepts) - 1)).indices.tolist()],
            },
            "cluster_similarity": {names[k]: _r(sim[i, k]) for k in range(len(names))},
        }
        if with_neurons:
            m["neuron_alignment"] = _neuron_entry(i, best_idx, best_cos, contrib, cfg)
        if heads is not None:
            m["per_head"] = _head_entry(head_norms[i], head_sel[i], inp.n_heads, cfg)
        if eig is not None:
            m["subspace_eigvals"] = [_r(e, 6) for e in eig[i, : cfg.eigvals_k].tolist()]
        per.append(m)
    ratio, scores = metrics.geometry(v, cfg.geometry_k)
    coh = metrics.cohesion(cos, labels, len(names))
    return {"concepts": per, "summary": _layer_summary(concepts, names, cos, coh, ratio, scores, cfg)}


def compute(inp: QualityInputs, cfg: QualityConfig = QualityConfig()) -> dict:
    """The quality.json document (plus the cosine matrices under ``_cosine`` for the plots)."""
    names = _cluster_order(inp.clusters)
    labels = torch.tensor([names.index(c) for c in inp.clusters])
    n_texts = len(inp.text_names)
    pos_member = metrics.membership(inp.sets.positives, n_texts)
    neg_member = metrics.membership(inp.sets.negatives, n_texts)
    with metrics.single_threaded():
        per_layer = {l: _layer_metrics(inp, l, cfg, names, labels, pos_member, neg_member) for l in inp.layers}

    concepts: dict[str, dict] = {}
    for i, c in enumerate(inp.concepts):
        layers = {str(l): per_layer[l]["concepts"][i] for l in inp.layers}
        concepts[c] = {
            "n_positives": len(inp.sets.positives[i]),
            "n_negatives": len(inp.sets.negatives[i]),
            "cluster": _cluster_verdict(inp, i, layers, names),
            "layers": layers,
        }
        concepts[c]["buckets"] = _buckets(concepts[c], cfg)
    triage = {b: [c for c, e in concepts.items() if b in e["buckets"]] for b in ACTIONS}
    triage = {b: _by_severity(b, members, concepts) for b, members in triage.items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"amygdala {__version__}",
        "readout": inp.meta,
        "config": asdict(cfg),
        "layers": list(inp.layers),
        "n_heads": inp.n_heads or None,
        "skipped": inp.skipped,
        "clusters": {
            n: {
                "members": [c for c, k in zip(inp.concepts, inp.clusters) if k == n],
                "cohesion": {str(l): per_layer[l]["summary"]["cohesion"][n] for l in inp.layers},
            }
            for n in names
        },
        "geometry": {str(l): per_layer[l]["summary"]["geometry"] for l in inp.layers},
        "triage": {b: {"concepts": triage[b], "action": ACTIONS[b], "meaning": MEANING[b]} for b in ACTIONS},
        "concepts": concepts,
        "_cosine": {l: per_layer[l]["summary"]["cosine"] for l in inp.layers},
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _cluster_verdict(inp: QualityInputs, i: int, layers: dict, names: list[str]) -> dict:
    """Manifest cluster vs the cluster whose centroid is nearest, per layer and on the mean
    similarity over layers (which decides ``wrong_cluster``)."""
    own = inp.clusters[i]
    mean_sim = {n: _mean([m["cluster_similarity"][n] for m in layers.values()]) for n in names}
    scored = {n: s for n, s in mean_sim.items() if s is not None}
    nearest = max(scored, key=scored.get) if scored else None

    def nearest_at(m: dict) -> str | None:
        s = {n: v for n, v in m["cluster_similarity"].items() if v is not None}
        return max(s, key=s.get) if s else None

    return {
        "manifest": own,
        "nearest": nearest,
        "wrong_cluster": bool(mean_sim[own] is not None and nearest != own),
        "margin": _r(scored[nearest] - mean_sim[own]) if nearest and mean_sim[own] is not None else None,
        "nearest_per_layer": {l: nearest_at(m) for l, m in layers.items()},
    }


def _buckets(entry: dict, cfg: QualityConfig) -> list[str]:
    """Triage of one concept on its means over the readout's layers; a concept can be in
    several problem buckets, and is clean or mixed only when it is in none."""
    ratio = _mean([m["first_pc_variance_ratio"] for m in entry["layers"].values()])
    r2 = _mean([m["redundancy"]["r2"] for m in entry["layers"].values()])
    entry["first_pc_variance_ratio_mean"] = _r(ratio)
    entry["r2_mean"] = _r(r2)
    out = []
    if ratio is not None and ratio < cfg.fragmented_below:
        out.append("fragmented")
    if r2 is not None and r2 > cfg.redundant_r2:
        out.append("redundant")
    if entry["cluster"]["wrong_cluster"]:
        out.append("wrong_cluster")
    if not out:
        out.append("clean" if ratio is not None and ratio > cfg.clean_above else "mixed")
    return out


def _by_severity(bucket: str, members: list[str], concepts: dict) -> list[str]:
    key = {
        "fragmented": lambda c: concepts[c]["first_pc_variance_ratio_mean"],
        "redundant": lambda c: -concepts[c]["r2_mean"],
        "wrong_cluster": lambda c: -(concepts[c]["cluster"]["margin"] or 0.0),
        "clean": lambda c: -concepts[c]["first_pc_variance_ratio_mean"],
        "mixed": lambda c: concepts[c]["first_pc_variance_ratio_mean"] or 0.0,
    }[bucket]
    return sorted(members, key=key)


def triage_table(report: dict, examples: int = 4) -> str:
    """The short table printed at the end of a run: bucket, count, worst examples, next action."""
    lines = [f"{'bucket':<14} {'n':>4}  {'worst first':<48} next action"]
    for bucket, entry in report["triage"].items():
        names = entry["concepts"]
        shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
        lines.append(f"{bucket:<14} {len(names):>4}  {shown:<48} {entry['action']}")
    return "\n".join(lines)


def to_json(report: dict) -> dict:
    """The report without the in-memory extras (the cosine matrices)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
