"""Two readouts side by side (``amygdala diff A B``): per shared concept the cosine of its two
vectors per layer, the concepts only one side has, and both evals. Why: two builds, two methods
or two corpora differ in ways a reader of either file alone cannot see; the cosine says how
far each concept's direction moved."""

from __future__ import annotations

from pathlib import Path

import torch

from amygdala.readout.card import eval_figures, eval_summary
from amygdala.readout.files import ReadoutError
from amygdala.readout.format import Readout


def layer_pairs(a: Readout, b: Readout) -> list[tuple[int, int]]:
    """(layer of ``a``, layer of ``b``) to compare: the same indices when the lists are equal,
    else by relative depth when both files record their model's layer count (each of ``a``'s
    layers with ``b``'s nearest in depth), else an error naming both lists."""
    if a.layers == b.layers:
        return [(l, l) for l in a.layers]
    na, nb = (r.meta.get("model", {}).get("num_layers") if isinstance(r.meta.get("model"), dict) else None for r in (a, b))
    if not (isinstance(na, int) and isinstance(nb, int) and na > 1 and nb > 1):
        raise ReadoutError(f"layers {a.layers} and {b.layers} differ and a readout does not record its model's layer "
                           "count (model.num_layers), so they cannot be matched by depth; rebuild with the same --layers")
    return [(l, min(b.layers, key=lambda m: abs(m / (nb - 1) - l / (na - 1)))) for l in a.layers]


def compare(a: Readout, b: Readout, eval_a: dict | None = None, eval_b: dict | None = None) -> dict:
    """The diff as JSON-ready data: ``layers`` (pairs), ``cosine`` {concept: [per pair]},
    ``only_a``, ``only_b``, and ``eval`` {"a": rows, "b": rows} when both have an eval."""
    if a.hidden_size != b.hidden_size:
        raise ReadoutError(f"hidden sizes {a.hidden_size} and {b.hidden_size} differ: the readouts are of different models")
    pairs = layer_pairs(a, b)
    shared = [c for c in a.concepts if c in b.concepts]
    cosine = {}
    for c in shared:
        i, j = a.concepts.index(c), b.concepts.index(c)
        cosine[c] = [float(torch.nn.functional.cosine_similarity(a.vectors[la][i], b.vectors[lb][j], dim=0)) for la, lb in pairs]
    out = {"layers": [list(p) for p in pairs], "cosine": cosine,
           "only_a": [c for c in a.concepts if c not in b.concepts], "only_b": [c for c in b.concepts if c not in a.concepts]}
    if eval_a and eval_b:
        out["eval"] = {"a": eval_summary(eval_a), "b": eval_summary(eval_b)}
    return out


def compare_folders(a: str | Path, b: str | Path) -> dict:
    """:func:`compare` of two readout folders (or repo ids), with each folder's eval.json."""
    ra, rb = Readout.load(a), Readout.load(b)
    evals = [eval_figures(p, r) if Path(p).is_dir() else None for p, r in ((a, ra), (b, rb))]
    return compare(ra, rb, *evals)


def diff_table(d: dict) -> str:
    """The diff for a terminal: one row per shared concept, one column per layer pair."""
    head = "concept              " + "".join(f"{f'{la}~{lb}':>10}" for la, lb in d["layers"])
    lines = [head] + [f"{c:<21}" + "".join(f"{x:>10.3f}" for x in v) for c, v in d["cosine"].items()]
    for side in ("only_a", "only_b"):
        if d[side]:
            lines.append(f"only in {side[-1].upper()}: {', '.join(d[side])}")
    for side, rows in (d.get("eval") or {}).items():
        for r in rows:
            lines.append(f"eval {side.upper()} layer {r['layer']}: concept top-1 {r['concept_top1']}, "
                         f"PC1~valence r {r['pc1_valence_r']}")
    return "\n".join(lines)
