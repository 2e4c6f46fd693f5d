"""The readout's model card: ``README.md`` in the readout folder, what a colleague handed the
folder needs to know (which weights, which corpus, how it was built, how good it is, how to
rebuild it) written on the folder itself.

Why it is written by :meth:`~amygdala.readout.Readout.save` and not by ``build`` alone: every
writer of a readout (``build``, ``import --into``, an interop tool) must refresh it, or the card
describes a save that is gone. It carries the save's ``pair`` id (readout.json and the
safetensors metadata carry the same), so a reader can tell the card belongs to these two files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amygdala.readout.format import Readout

CARD = "README.md"
#: The file ``amygdala eval --out FOLDER`` writes (validity/run.py's JSON_NAME); read here, not imported: readout may not import validity.
EVAL = "eval.json"


def eval_figures(folder: str | Path, readout: Readout) -> dict | None:
    """The ``eval.json`` in ``folder`` when it evaluated these concepts, else ``None`` (missing,
    unreadable, or from another readout: a card must not show figures of a different file)."""
    try:
        result = json.loads((Path(folder) / EVAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("concepts") != list(readout.concepts):
        return None
    return result if isinstance(result.get("validity"), dict) else None


def eval_summary(result: dict | None) -> list[dict]:
    """One row per layer (and ``all``) of held-out accuracy and geometry from an eval result:
    ``{"layer", "concept_top1", "concept_top5", "cluster_top1", "pc1_valence_r", "pc2_arousal_r"}``
    (``None`` where the eval did not measure it)."""
    if not result:
        return []
    v = result.get("validity") or {}
    heldout, geometry = v.get("heldout") or {}, v.get("geometry") or {}
    rows = []
    for key in list(dict.fromkeys([*heldout, *geometry])):
        h, g = heldout.get(key) or {}, geometry.get(key) or {}
        rows.append({"layer": key, **{k: h.get(k) for k in ("concept_top1", "concept_top5", "cluster_top1")},
                     **{k: g.get(k) for k in ("pc1_valence_r", "pc2_arousal_r")}})
    return rows


def _num(x: object, pct: bool = False) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def model_card(readout: Readout, evaluation: dict | None = None, pair: str | None = None) -> str:
    """The card's Markdown for ``readout``.

    Args:
        readout: the readout it describes.
        evaluation: an ``amygdala eval`` result for it (:func:`eval_figures`); ``None``: the card
            says how to get one.
        pair: the save's pair id (default: the one ``readout`` was loaded with).
    """
    meta = readout.meta
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    weights = readout.weights or {}
    corpus = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else {}
    pair = pair or meta.get("pair")
    lines = [f"# Readout: {len(readout.concepts)} concepts of {model.get('name') or 'an unrecorded model'}", "",
             "Concept directions in the residual stream, read and steered with amygdala "
             "(`amygdala read --readout THIS_FOLDER \"text\"`; the format: docs/readout-format.md).", "",
             f"This card describes the save with pair id `{pair or 'unrecorded'}` "
             "(readout.json's `pair`, the safetensors metadata's `pair`): if they differ, the card is stale; "
             "any save of the readout rewrites it.", "", "## Base model", ""]
    lines.append(f"- name: {model.get('name') or '-'} ({model.get('num_layers') or '?'} layers, hidden {readout.hidden_size})")
    lines.append(f"- path: `{weights.get('path') or '-'}`")
    lines.append(f"- weights dtype: {weights.get('dtype') or '-'}; loaded as {weights.get('loaded_as') or '-'}")
    source = weights.get("source") if isinstance(weights.get("source"), dict) else None
    lines.append(f"- quantisation: {source.get('quantisation')} (dequantised from `{source.get('file')}`, "
                 f"sha256 `{source.get('sha256')}`)" if source else "- quantisation: none recorded")
    for f in weights.get("files") or []:
        if isinstance(f, dict):
            lines.append(f"- `{f.get('name')}`: {f.get('size')} bytes, sha256 `{f.get('sha256')}`")
    if not weights:
        lines.append("- no weights record (a file from before amygdala recorded one)")
    lines += ["", "## How it was built", ""]
    params = meta.get("method_params") or {}
    lines.append(f"- method: {meta.get('method') or '-'}" + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))
    lines.append(f"- pooling: {readout.pooling}; chat template: {'yes' if meta.get('chat_template') else 'no'}")
    depths = model.get("num_layers")
    lines.append("- layers: " + ", ".join(f"{l}" + (f" ({l / (depths - 1):.0%} depth)" if isinstance(depths, int) and depths > 1 else "")
                                        for l in readout.layers))
    lines.append(f"- construction: {readout.construction}")
    lines.append(f"- statistics: {', '.join(readout.statistics) or 'none (raw projections)'}"
                 + (f"; default {readout.default_statistics}" if readout.statistics else ""))
    lines.append(f"- tracks: {', '.join(readout.track_names) or 'none'}")
    lines.append(f"- corpus: `{corpus.get('path') or '-'}`, sha256 `{corpus.get('sha256') or '-'}`")
    lines.append(f"- stored vectors: {meta.get('dtype', 'float32')}")
    imported = meta.get("imported") if isinstance(meta.get("imported"), dict) else {}
    if imported:
        lines.append("- imported concepts (not rebuilt by the command below; `amygdala import` them again): "
                     + ", ".join(f"{n} from `{i.get('from')}` (sha256 `{i.get('sha256')}`)" for n, i in imported.items()
                                 if isinstance(i, dict)))
    lines += ["", "## Evaluation", ""]
    rows = eval_summary(evaluation)
    if rows:
        lines += ["| layer | concept top-1 | concept top-5 | cluster top-1 | PC1~valence r | PC2~arousal r |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {_num(r['concept_top1'], True)} | {_num(r['concept_top5'], True)} | "
                  f"{_num(r['cluster_top1'], True)} | {_num(r['pc1_valence_r'])} | {_num(r['pc2_arousal_r'])} |" for r in rows]
    else:
        corpus_flag = f" --corpus {corpus['path']}" if corpus.get("path") else ""
        lines.append("No evaluation in this folder. To add one (it is shown here on the next save):")
        lines += ["", "```", f"amygdala eval --readout THIS_FOLDER --model {model.get('name') or 'MODEL'}{corpus_flag} --out THIS_FOLDER", "```"]
    lines += ["", "## Rebuild", ""]
    command = meta.get("command")
    if isinstance(command, str) and command:
        lines += ["```", command, "```"]
    else:
        lines.append("No build command recorded (this readout was not made by `amygdala build`).")
    lines.append("")
    concepts = ", ".join(readout.concepts)
    lines += ["## Concepts", "", concepts, ""]
    return "\n".join(lines)
