"""report.html: one self-contained file (PNG images inline as base64, no scripts, no external
links), so it can be mailed, archived beside the readout, or opened from any folder."""

from __future__ import annotations

from html import escape

from amygdala.figures import STYLE, _figure, plots
from amygdala.quality.report import QualityConfig

def _link(c: str) -> str:
    return f'<a href="#c-{escape(c)}">{escape(c)}</a>'


def _num(x, fmt: str = ".2f") -> str:
    return "" if x is None else format(x, fmt)


def _buckets(bs: list[str]) -> str:
    return " ".join(f'<span class="b-{b}">{b}</span>' for b in bs)


def _concept_section(name: str, e: dict, layers: list[int]) -> str:
    cl = e["cluster"]
    verdict = (f'manifest cluster <b>{escape(cl["manifest"])}</b>, nearest centroid <b>{escape(str(cl["nearest"]))}</b>'
               + (f' (margin {_num(cl["margin"], ".3f")})' if cl["wrong_cluster"] else ""))
    rows = []
    for l in layers:
        m = e["layers"][str(l)]
        near = ", ".join(f"{_link(c)} {_num(s)}" for c, s in m["nearest_concepts"])
        coefs = ", ".join(f"{_link(c)} {s:+.2f}" for c, s in m["redundancy"]["top"])
        neuron = ""
        if "neuron_alignment" in m:
            n = m["neuron_alignment"]
            top = ", ".join(f"#{j} {v:+.3g}" for j, v in n["top_contributions"][:5])
            neuron = (f'best #{n["neuron"]} cos {n["cos"]:+.2f}{" <b>one neuron</b>" if n["single_neuron"] else ""}'
                      f'<br>contributions: {top}<br>MLP total {n["mlp_total"]:+.3g}')
        heads = ""
        if "per_head" in m:
            h = m["per_head"]
            top = ", ".join(f"h{i} {nm:.2f} (sel {s:.1f})" for i, nm, s in h["top"][:5])
            heads = f'concentration {h["head_concentration"]:.2f} (top {h["k"]}; even {h["even"]:.2f})<br>{top}'
        outliers = "<br>".join(f"<code>{escape(o)}</code>" for o in m["outliers"])
        eig = ""
        if "subspace_eigvals" in m:
            eig = "<br>eigvals: " + ", ".join(_num(v, ".3g") for v in m["subspace_eigvals"][:6])
        rows.append(
            f'<tr><td class="num">{l}</td><td class="num">{_num(m["first_pc_variance_ratio"])}{eig}</td><td>{outliers}</td>'
            f'<td>{near}</td><td class="num">{_num(m["redundancy"]["r2"])}</td><td>{coefs}</td>'
            f"<td>{neuron}</td><td>{heads}</td></tr>"
        )
    align = "; ".join(
        f"<code>{escape(t)}</code> {_num(a)}" for t, a in e["layers"][str(layers[-1])]["alignment"]
    )
    return (
        f'<section class="concept" id="c-{escape(name)}"><h3>{escape(name)} {_buckets(e["buckets"])}</h3>'
        f'<p>{verdict}; {e["n_positives"]} positive texts, {e["n_negatives"]} negatives; mean first PC '
        f'{_num(e["first_pc_variance_ratio_mean"])}, mean R<sup>2</sup> {_num(e["r2_mean"])}. '
        f'<a href="#triage">back to triage</a></p>'
        "<table><tr><th>layer</th><th>first PC</th><th>outlying texts</th><th>nearest concepts</th><th>R<sup>2</sup></th>"
        "<th>top coefficients</th><th>neurons</th><th>heads</th></tr>"
        + "".join(rows) + "</table>"
        f"<p>alignment of each text with the vector at layer {layers[-1]}: {align}</p></section>"
    )


def render(report: dict, cfg: QualityConfig) -> str:
    """The whole report.html for a :func:`amygdala.quality.report.compute` result."""
    layers = report["layers"]
    concepts = list(report["concepts"])
    clusters = [e["cluster"]["manifest"] for e in report["concepts"].values()]
    wrong = set(report["triage"]["wrong_cluster"]["concepts"])
    info = report["readout"]
    head = ", ".join(f"{k}: {escape(str(v))}" for k, v in info.items() if not isinstance(v, (dict, list)))

    triage_rows = "".join(
        f'<tr><td class="b-{b}">{b}</td><td class="num">{len(t["concepts"])}</td><td>{escape(t["meaning"])}</td>'
        f'<td>{escape(t["action"])}</td><td>{", ".join(_link(c) for c in t["concepts"])}</td></tr>'
        for b, t in report["triage"].items()
    )
    skipped = "".join(f"<li>layer {s['layer']}, {escape(s['metric'])}: {escape(s['reason'])}</li>" for s in report["skipped"])

    figures = [
        _figure("plot-triage", plots.triage_scatter(report, cfg.fragmented_below, cfg.clean_above, cfg.redundant_r2),
                "Every concept by mean first-PC ratio and ridge R^2, coloured by its first triage bucket."),
        _figure("plot-cohesion", plots.cohesion_curve(report),
                "Cluster cohesion (mean within-cluster cosine minus mean between-cluster cosine) across layers."),
        _figure("plot-spectra", plots.spectra(report),
                "Eigenvalue spectra: of the concept vectors per layer, and of the subspace method when it was used."),
    ]
    for l in layers:
        g = report["geometry"][str(l)]
        figures.append(_figure(f"plot-heatmap-{l}", plots.heatmap(report["_cosine"][l], concepts, clusters, l),
                               f"Layer {l}: cosine between concept vectors, ordered by manifest cluster."))
        figures.append(_figure(f"plot-map-{l}", plots.concept_map(g["map"], concepts, clusters, l, g["two_pc_share"], wrong),
                               f"Layer {l}: 2-D map of the concepts, coloured by manifest cluster; rings mark wrong_cluster."))

    geo_rows = "".join(
        f'<tr><td class="num">{l}</td><td class="num">{_num(g["two_pc_share"])}</td>'
        + "".join(
            f'<td>{", ".join(_link(c) for c, _ in g[pc][pole])}</td>' for pc in ("pc1", "pc2") for pole in ("positive", "negative")
        )
        + "</tr>"
        for l, g in ((l, report["geometry"][str(l)]) for l in layers)
    )
    cluster_rows = "".join(
        f'<tr><td>{escape(n)}</td><td class="num">{len(c["members"])}</td>'
        + "".join(f'<td class="num">{_num(c["cohesion"][str(l)])}</td>' for l in layers) + "</tr>"
        for n, c in report["clusters"].items()
    )
    index_rows = "".join(
        f'<tr><td>{_link(c)}</td><td>{escape(e["cluster"]["manifest"])}</td><td>{_buckets(e["buckets"])}</td>'
        f'<td class="num">{_num(e["first_pc_variance_ratio_mean"])}</td><td class="num">{_num(e["r2_mean"])}</td>'
        f'<td>{escape(str(e["cluster"]["nearest"]))}</td></tr>'
        for c, e in report["concepts"].items()
    )
    details = "".join(_concept_section(c, e, layers) for c, e in report["concepts"].items())
    validity = ""
    if report.get("validity"):
        from amygdala.validity.report import html_section

        validity = html_section(report["validity"], concepts, clusters)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>amygdala quality report</title><style>{STYLE}</style></head>
<body>
<h1>Quality report</h1>
<p>{head}; layers {", ".join(map(str, layers))}; {len(concepts)} concepts; {escape(report["created_by"])}.
Thresholds: clean above {cfg.clean_above}, fragmented below {cfg.fragmented_below}, redundant above R<sup>2</sup>
{cfg.redundant_r2} (ridge lambda {cfg.ridge_lambda}). Numbers per layer are in each concept's section; triage uses
their means over layers.</p>
<h2 id="triage">Triage</h2>
<table><tr><th>bucket</th><th>n</th><th>meaning</th><th>next action</th><th>concepts (worst first)</th></tr>{triage_rows}</table>
{f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else ""}
<h2 id="pictures">Pictures</h2>
{"".join(figures)}
{validity}
<h2 id="geometry">Geometry</h2>
<table><tr><th>layer</th><th>PC1+PC2 share</th><th>PC1 +</th><th>PC1 -</th><th>PC2 +</th><th>PC2 -</th></tr>{geo_rows}</table>
<h2 id="clusters">Clusters</h2>
<table><tr><th>cluster</th><th>members</th>{"".join(f"<th>cohesion L{l}</th>" for l in layers)}</tr>{cluster_rows}</table>
<h2 id="concepts">Concepts</h2>
<table><tr><th>concept</th><th>cluster</th><th>buckets</th><th>first PC</th><th>R<sup>2</sup></th><th>nearest cluster</th></tr>{index_rows}</table>
{details}
</body></html>
"""
