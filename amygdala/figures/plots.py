"""The report's pictures as PNG bytes, drawn with matplotlib's object API on the Agg canvas
(no pyplot, no global backend switch, no display needed).

Sizes grow with the number of concepts so that 200 concept names stay legible when the image
is viewed at full size: every heatmap row gets 11 pixels and a 6-point label.
"""

from __future__ import annotations

import io

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
ROW_INCHES = 0.11  # heatmap row height
BUCKET_COLOURS = {"clean": "#2a9d8f", "mixed": "#b0b0b0", "fragmented": "#e76f51", "redundant": "#8e44ad", "wrong_cluster": "#e9c46a"}


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def cluster_colours(names: list[str]) -> dict[str, tuple]:
    cmap = colormaps["tab20"] if len(names) <= 20 else colormaps["hsv"]
    n = 20 if len(names) <= 20 else len(names) + 1
    return {c: cmap(i % n / (n - 1) if n > 1 else 0.0) for i, c in enumerate(names)}


def cluster_order(concepts: list[str], clusters: list[str]) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Concept indices grouped by cluster (clusters in first-seen order, members in manifest
    order) and each cluster's [start, end) span in that order."""
    names = list(dict.fromkeys(clusters))
    order, spans = [], []
    for n in names:
        members = [i for i, c in enumerate(clusters) if c == n]
        spans.append((n, len(order), len(order) + len(members)))
        order += members
    return order, spans


def _curves(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The spectra's panels: integer ranks along x, axis labels, a title, the legend and a light grid."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _label_size(row_inches: float) -> float:
    """Font size (points) of a label that fills 80% of a row ``row_inches`` tall, 9 at most."""
    return min(9.0, row_inches * 72 * 0.8)


def heatmap(cos: torch.Tensor, concepts: list[str], clusters: list[str], layer: int) -> bytes:
    """Concept-by-concept cosine, ordered by cluster, cluster boundaries drawn and named."""
    order, spans = cluster_order(concepts, clusters)
    m = cos[order][:, order].float().numpy()
    n = len(order)
    off = abs(m - torch.eye(n).numpy()).max() if n > 1 else 1.0
    # Fixed margins in inches around a matrix of 8.5 px per row: labels never squeeze it.
    side, left, right, top, bottom = max(4.0, ROW_INCHES * n), 1.6, 3.0, 1.9, 1.6
    width, height = left + side + right, bottom + side + top
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    cax = fig.add_axes(((left + side + 2.1) / width, bottom / height, 0.2 / width, side / height))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-off, vmax=off, interpolation="nearest")
    fs = _label_size(side / n)
    ax.set_xticks(range(n), [concepts[i] for i in order], rotation=90, fontsize=fs)
    ax.set_yticks(range(n), [concepts[i] for i in order], fontsize=fs)
    for _, start, _ in spans[1:]:
        ax.axhline(start - 0.5, color="black", lw=0.8)
        ax.axvline(start - 0.5, color="black", lw=0.8)
    names_x = ax.secondary_xaxis("top")
    names_x.set_xticks([(s + e - 1) / 2 for _, s, e in spans], [name for name, _, _ in spans], rotation=60,
                   fontsize=max(fs + 2, 7), ha="left")
    names_y = ax.secondary_yaxis("right")
    names_y.set_yticks([(s + e - 1) / 2 for _, s, e in spans], [name for name, _, _ in spans], fontsize=max(fs + 2, 7))
    fig.colorbar(im, cax=cax, label="cosine")
    fig.suptitle(f"layer {layer}: cosine between concept vectors, ordered by cluster", y=1 - 0.3 / height)
    return png(fig)


def concept_map(
    scores: list[list[float]], concepts: list[str], clusters: list[str], layer: int, share: float, marked: set[str],
    *, xlabel: str = "PC 1", ylabel: str = "PC 2", title: str | None = None,
) -> bytes:
    """The concepts on the first two principal components of the concept vectors, coloured by
    manifest cluster; ``marked`` concepts (in the wrong cluster) get a black ring."""
    names = list(dict.fromkeys(clusters))
    colours = cluster_colours(names)
    n = len(concepts)
    side = max(7.0, 0.05 * n + 6)
    fig = Figure(figsize=(side + 3, side))
    ax = fig.add_axes((0.06, 0.06, 0.7, 0.88))
    xs = [s[0] for s in scores]
    ys = [s[1] for s in scores]
    for name in names:
        idx = [i for i, c in enumerate(clusters) if c == name]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=28, color=colours[name], label=name, zorder=2)
    ring = [i for i, c in enumerate(concepts) if c in marked]
    if ring:
        ax.scatter([xs[i] for i in ring], [ys[i] for i in ring], s=70, facecolors="none", edgecolors="black", lw=1.0,
                   label="wrong cluster", zorder=3)
    fs = 6.5 if n > 60 else 8
    for i, c in enumerate(concepts):
        ax.annotate(c, (xs[i], ys[i]), xytext=(3, 2), textcoords="offset points", fontsize=fs, alpha=0.85)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"layer {layer}: concept vectors on their first two principal components ({share:.0%} of variance)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return png(fig)


def affect_map(scores: list[list[float]], concepts: list[str], clusters: list[str], layer: int) -> bytes:
    """The concepts on PC1/PC2 oriented as valence (x) and arousal (y), coloured by cluster."""
    return concept_map(scores, concepts, clusters, layer, 0.0, set(),
                       xlabel="PC 1 (oriented: valence grows to the right)", ylabel="PC 2 (oriented: arousal grows upward)",
                       title=f"layer {layer}: concept vectors on their first two principal components")


def cohesion_curve(report: dict) -> bytes:
    """Per cluster, mean within-cluster minus mean between-cluster cosine, across layers."""
    layers = report["layers"]
    names = list(report["clusters"])
    colours = cluster_colours(names)
    fig = Figure(figsize=(11, 6))
    ax = fig.add_axes((0.1, 0.1, 0.6, 0.8))
    drawn = 0
    for name in names:
        ys = [report["clusters"][name]["cohesion"][str(l)] for l in layers]
        if all(y is None for y in ys):
            continue
        ax.plot(layers, [float("nan") if y is None else y for y in ys], marker="o", color=colours[name], label=name)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no cluster has a cohesion: it needs two members and concepts outside it",
                transform=ax.transAxes, ha="center")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("within - between cosine")
    ax.set_title("cluster cohesion across layers (above 0: the cluster holds together)")
    if drawn:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return png(fig)


def spectra(report: dict) -> bytes:
    """Left: explained-variance spectrum of the concept vectors per layer (how many dimensions
    the concept set spans). Right, when the method is subspace: each layer's median over
    concepts of the top eigenvalues of M_pos - M_base, scaled by the first, with the quartiles."""
    layers = report["layers"]
    eig = {l: [e["layers"][str(l)].get("subspace_eigvals") for e in report["concepts"].values()] for l in layers}
    has_eig = any(v is not None for vals in eig.values() for v in vals)
    fig = Figure(figsize=(13 if has_eig else 7.5, 5))
    axes = fig.subplots(1, 2 if has_eig else 1, squeeze=False)[0]
    ax = axes[0]
    for l in layers:
        ev = report["geometry"][str(l)]["explained_variance"]
        ax.plot(range(1, len(ev) + 1), ev, marker=".", label=f"layer {l}")
    ax.set_yscale("log")
    _curves(ax, "principal component of the concept vectors", "share of variance", "concept-vector spectrum")
    if has_eig:
        ax = axes[1]
        for l in layers:
            rows = [torch.tensor(v, dtype=torch.float64) for v in eig[l] if v]
            k = min(len(r) for r in rows)
            m = torch.stack([r[:k] / r[0] if r[0] > 0 else r[:k] for r in rows])
            q = torch.quantile(m, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
            xs = list(range(1, k + 1))
            ax.plot(xs, q[1].tolist(), marker=".", label=f"layer {l}")
            ax.fill_between(xs, q[0].tolist(), q[2].tolist(), alpha=0.2)
        _curves(ax, "eigenvalue rank", "eigenvalue / first", "subspace eigenvalues of M_pos - M_base (median, quartiles)")
    fig.tight_layout()
    return png(fig)


def triage_scatter(report: dict, fragmented_below: float, clean_above: float, redundant_r2: float) -> bytes:
    """Every concept by its mean first-PC ratio and ridge R^2, coloured by triage bucket."""
    fig = Figure(figsize=(10, 7))
    ax = fig.add_axes((0.08, 0.1, 0.7, 0.82))
    for bucket, colour in BUCKET_COLOURS.items():
        pts = [(e["first_pc_variance_ratio_mean"], e["r2_mean"], c) for c, e in report["concepts"].items()
               if e["buckets"][0] == bucket and e["first_pc_variance_ratio_mean"] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, color=colour, label=f"{bucket} ({len(pts)})")
            if bucket in ("fragmented", "redundant"):  # the buckets these two axes decide
                for x, y, c in pts:
                    ax.annotate(c, (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6)
    for x in (fragmented_below, clean_above):
        ax.axvline(x, color="black", lw=0.8, ls="--")
    ax.axhline(redundant_r2, color="black", lw=0.8, ls="--")
    ax.set_xlabel("first PC variance ratio (mean over layers)")
    ax.set_ylabel("ridge R^2 on the other concepts (mean over layers)")
    ax.set_title("triage (colour: first bucket): fragmented left of the first line, clean right of the second,\n"
                 "redundant above the horizontal line")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return png(fig)
