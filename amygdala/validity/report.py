"""Whether the vectors mean what they say, from one forward's pooled rows: held-out accuracy per
layer (refit without the held-out texts) and the valence/arousal geometry of the vectors.

The same dictionary goes into quality.json (``validity``), ``amygdala eval``'s JSON and both
HTML pages. Steering efficacy (:mod:`amygdala.validity.steering`) needs generation, so only
``amygdala eval`` adds it.
"""

from __future__ import annotations

from html import escape

from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.methods import METHODS, check_params
from amygdala.validity.geometry import geometry
from amygdala.validity.heldout import held_out
from amygdala.readout import Readout


def validity(readout: Readout, corpus: Corpus, acts: Activations, *, max_folds: int | None = None) -> dict:
    """Held-out accuracy of the readout's method (refit per fold) and its vectors' geometry."""
    method = readout.meta.get("method") or "diffmean"
    out: dict = {"method": method, "pooling": readout.pooling}
    if method in METHODS and not METHODS[method].needs_tokens:
        params = check_params(method, readout.meta.get("method_params") or {})
        results = held_out(corpus, acts, method, max_folds=max_folds, **params)
        out["heldout"] = {str(k): r.to_json() for k, r in results.items()}
    else:
        out["heldout"] = None
        out["heldout_skipped"] = (f"method {method!r} refits from per-token bases, which one forward does not keep per "
                                  "fold; evaluate a pooled method built with the same pooling instead")
    out["geometry"] = {
        str(l): geometry(readout.vectors[l].float(), corpus.valence(), corpus.arousal(), corpus.concept_polarity())
        for l in readout.layers
    }
    return out


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def table(v: dict) -> str:
    """The figures as plain text: held-out accuracy and geometry per layer, chance and paper beside."""
    lines = [f"method {v['method']}, pooling {v['pooling']}"]
    if v.get("heldout"):
        lines.append("held out     n   concept top-1   top-5   cluster top-1   (chance: top-1 / top-5 / cluster)")
        for k, r in v["heldout"].items():
            c = r["chance"]
            lines.append(f"{'layer ' + k if k != 'all' else 'all layers':<10}{r['n']:>5}   {_pct(r['concept_top1']):>13}"
                         f" {_pct(r['concept_top5']):>7} {_pct(r['cluster_top1']):>15}   "
                         f"({_pct(c['concept_top1'])} / {_pct(c['concept_top5'])} / {_pct(c['cluster_top1'])})")
    elif v.get("heldout_skipped"):
        lines.append(f"held out: skipped ({v['heldout_skipped']})")
    lines.append("geometry   |r| PC1~valence  |r| PC2~arousal  PC1 +/- cluster AUC  decodable valence / arousal r"
                 "   (paper: 0.81 / 0.66)")
    for l, g in v["geometry"].items():
        auc = "" if g["pc1_polarity_auc"] is None else f"{g['pc1_polarity_auc']:.2f}"
        dec = " / ".join("-" if g.get(k) is None else f"{g[k]:.2f}" for k in ("decodable_valence_r", "decodable_arousal_r"))
        lines.append(f"layer {l:<5}{g['pc1_valence_r']:>15.2f}{g['pc2_arousal_r']:>17.2f}{auc:>21}{dec:>30}")
    return "\n".join(lines)


def html_section(v: dict, concepts: list[str], clusters: list[str]) -> str:
    """The validity section of a report page: the tables and, per layer, the valence/arousal map."""
    from amygdala.figures import _figure
    from amygdala.figures.plots import affect_map

    parts = [f"<h2 id=\"validity\">Validity</h2><p>Method {escape(v['method'])}, pooling {escape(v['pooling'])}.</p>"]
    if v.get("heldout"):
        rows = "".join(
            f"<tr><td>{'all layers' if k == 'all' else 'layer ' + k}</td><td class=\"num\">{r['n']}</td>"
            f"<td class=\"num\">{_pct(r['concept_top1'])} ({_pct(r['chance']['concept_top1'])})</td>"
            f"<td class=\"num\">{_pct(r['concept_top5'])} ({_pct(r['chance']['concept_top5'])})</td>"
            f"<td class=\"num\">{_pct(r['cluster_top1'])} ({_pct(r['chance']['cluster_top1'])})</td>"
            f"<td>{escape(', '.join(f'{a}->{b} ({n})' for a, b, n in r['confused']))}</td></tr>"
            for k, r in v["heldout"].items()
        )
        parts.append("<h3>Held-out accuracy (chance in brackets)</h3><table><tr><th>scores</th><th>n</th><th>concept top-1</th>"
                     f"<th>top-5</th><th>cluster top-1</th><th>most confused</th></tr>{rows}</table>")
    elif v.get("heldout_skipped"):
        parts.append(f"<p>Held-out accuracy skipped: {escape(v['heldout_skipped'])}</p>")
    rows = "".join(
        f"<tr><td>layer {l}</td><td class=\"num\">{g['pc1_valence_r']:.2f}</td><td class=\"num\">{g['pc2_arousal_r']:.2f}</td>"
        f"<td class=\"num\">{'' if g['pc1_polarity_auc'] is None else format(g['pc1_polarity_auc'], '.2f')}</td>"
        f"<td class=\"num\">{'' if g.get('decodable_valence_r') is None else format(g['decodable_valence_r'], '.2f')}</td>"
        f"<td class=\"num\">{g['n_rated']}</td></tr>"
        for l, g in v["geometry"].items()
    )
    parts.append("<h3>Emotion geometry</h3><table><tr><th></th><th>|r| PC1 ~ valence</th><th>|r| PC2 ~ arousal</th>"
                 f"<th>PC1 positive/negative-cluster AUC</th><th>valence decodable (cross-validated r)</th><th>concepts rated</th></tr>{rows}"
                 "<tr><td>published study</td><td class=\"num\">0.81</td><td class=\"num\">0.66</td><td></td><td></td><td>171</td></tr></table>")
    for l, g in v["geometry"].items():
        parts.append(_figure(f"plot-affect-{l}", affect_map(g["map"], concepts, clusters, int(l)),
                             f"Layer {l}: the concepts on PC1 (oriented to grow with valence) and PC2 (oriented to grow "
                             "with arousal), coloured by manifest cluster."))
    return "".join(parts)
