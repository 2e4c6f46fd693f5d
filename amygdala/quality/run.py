"""Filling the report's inputs from a model run, and writing quality.json + report.html.

Two entry points, one forward pass each:
- :func:`from_build` reuses a :class:`~amygdala.pipeline.BuildResult` whose forward already
  pooled the attention and MLP projection inputs (``BuildConfig(quality_sites=True)``), so
  ``amygdala build --quality-report`` runs the model once.
- :func:`run_quality` is ``amygdala quality``: it validates the readout, corpus and model
  before loading the model, then runs one forward with the same captures (and, for a subspace
  readout, the per-token bases whose eigenvalues the report plots).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from amygdala import AmygdalaError
from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.methods import METHODS, TokenSubspaces, check_params, concept_sets, fit
from amygdala.models import load_model
from amygdala.pipeline import collect_corpus, corpus_for, matching_model
from amygdala.models.layers import (
    attention_out_proj,
    find_layers,
    missing_reason,
    mlp_down_proj,
    num_attention_heads,
    projection_sites,
    projection_weight,
)
from amygdala.quality.report import QualityConfig, QualityInputs, compute, to_json
from amygdala.validity.report import validity
from amygdala.readout import Readout

log = logging.getLogger(__name__)

EIGENVALUES = "subspace_eigenvalues"  # the name methods.fit gives them in its extras
JSON_NAME, HTML_NAME = "quality.json", "report.html"


def text_names(corpus: Corpus, acts: Activations) -> list[str]:
    """Where each pooled row comes from (``stories/calm.txt:7``; the first place for a text
    that appears twice), so outlying texts can be opened and rewritten."""
    names = [""] * len(acts.texts)
    for t in reversed(corpus.texts):
        if t.text in acts.row:
            names[acts.row[t.text]] = t.where(corpus.root)
    return names


def quality_inputs(
    readout: Readout, corpus: Corpus, acts: Activations, model, eigvals: dict[int, torch.Tensor] | None = None
) -> QualityInputs:
    """The report's inputs: the readout's vectors, the run's pooled rows and site captures, the
    down-projection weights (copied to the CPU, where the vectors are), and what was skipped."""
    if list(corpus.concepts) != list(readout.concepts):
        raise AmygdalaError("the corpus's concepts differ from the readout's; pass the corpus it was built from")
    blocks = find_layers(model)
    heads, neurons, down, skipped = {}, {}, {}, []
    n_heads = num_attention_heads(model)
    for l in readout.layers:
        if attention_out_proj(blocks[l]) is None:
            skipped.append({"layer": l, "metric": "per_head", "reason": missing_reason(blocks[l], "attention")})
        elif f"attn.{l}" in acts.sites:
            heads[l] = acts.sites[f"attn.{l}"]
        mlp = mlp_down_proj(blocks[l])
        if mlp is None:
            skipped.append({"layer": l, "metric": "neuron_alignment", "reason": missing_reason(blocks[l], "MLP down projection")})
        elif f"mlp.{l}" in acts.sites:
            neurons[l] = acts.sites[f"mlp.{l}"]
            down[l] = projection_weight(mlp)
    clusters = readout.meta.get("clusters") or corpus.cluster_of()
    return QualityInputs(
        concepts=list(readout.concepts),
        clusters=list(clusters),
        layers=list(readout.layers),
        vectors={l: readout.vectors[l].float() for l in readout.layers},
        pooled={l: acts.pooled[l] for l in readout.layers},
        sets=concept_sets(corpus, acts),
        text_names=text_names(corpus, acts),
        heads=heads,
        n_heads=n_heads,
        neurons=neurons,
        down=down,
        eigvals=dict(eigvals or {}),
        skipped=skipped,
        meta={
            "method": readout.meta.get("method"),
            "model": (readout.meta.get("model") or {}).get("name"),
            "corpus": str(corpus.root) if corpus.root else None,
        },
    )


def write(report: dict, cfg: QualityConfig, out: str | Path) -> tuple[Path, Path]:
    """quality.json and report.html into folder ``out``."""
    from amygdala.quality.html import render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, hpath = out / JSON_NAME, out / HTML_NAME
    jpath.write_text(json.dumps(to_json(report), indent=1) + "\n")
    hpath.write_text(render(report, cfg))
    return jpath, hpath


def from_build(result, corpus: Corpus, cfg: QualityConfig = QualityConfig()) -> dict:
    """The report of a build in this process, from its activations: no forward runs."""
    inputs = quality_inputs(result.readout, corpus, result.activations, result.model, result.extras.get(EIGENVALUES))
    report = compute(inputs, cfg)
    report["validity"] = validity(result.readout, corpus, result.activations)
    return report


def run_quality(
    readout_path: str | Path,
    corpus: Corpus,
    out: str | Path,
    *,
    model: str | None = "default",
    device: str | None = None,
    dtype: str | None = None,
    cfg: QualityConfig = QualityConfig(),
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """``amygdala quality``: everything checked before the model loads, then one forward."""
    readout = Readout.load(readout_path)
    corpus = corpus_for(readout, corpus)
    info = matching_model(readout, model)
    method = readout.meta.get("method")
    params = check_params(method, readout.meta.get("method_params") or {}) if method in METHODS else {}
    Path(out).mkdir(parents=True, exist_ok=True)

    loaded_model, tokenizer, _ = load_model(info.path, device, dtype)
    tokens = None
    if method in METHODS and METHODS[method].needs_tokens:
        tokens = TokenSubspaces(readout.layers, info.hidden_size, next(loaded_model.parameters()).device)
    acts, _ = collect_corpus(
        corpus, loaded_model, tokenizer, readout.layers, pooling=readout.pooling,
        chat_template=bool(readout.meta.get("chat_template")), batch_size=batch_size, progress=progress,
        tokens=tokens, neutral=False, sites=projection_sites(loaded_model, readout.layers),
    )
    eigvals = None
    if tokens is not None:
        eigvals = fit(method, acts, concept_sets(corpus, acts), tokens=tokens, **params).extras.get(EIGENVALUES)
    report = compute(quality_inputs(readout, corpus, acts, loaded_model, eigvals), cfg)
    report["validity"] = validity(readout, corpus, acts)
    write(report, cfg, out)
    return report
