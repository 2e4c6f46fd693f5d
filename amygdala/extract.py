"""The training pipeline behind ``amygdala train``: corpus -> activations -> vectors -> file.

Everything that can fail without the model is checked before it loads (lesson 7): the corpus,
the concept selection, the minimum positives, the layers against the model's config.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amygdala import AmygdalaError
from amygdala.activations import Activations, collect
from amygdala.corpus import Corpus
from amygdala.methods import METHODS, TokenSubspaces, check_params, concept_sets, fit
from amygdala.models import load_model, model_info, parse_layers, relative_depth, resolve_model
from amygdala.models.layers import projection_sites
from amygdala.readout import Readout

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of ``amygdala train``; the defaults are the CLI's."""

    model: str | None = "default"
    layers: str = "0.5,0.66"
    method: str = "diffmean"
    method_params: dict = field(default_factory=dict)
    min_positives: int = 3
    chat_template: bool = False
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True
    #: Also pool the attention output and MLP down projections' inputs in the same forward
    #: (``activations.sites``), for the quality report (``train --quality-report``).
    quality_sites: bool = False


@dataclass
class TrainResult:
    readout: Readout
    activations: Activations
    model: object
    tokenizer: object
    #: Per-method by-products, per name and layer, e.g. ``subspace_eigenvalues`` [n_concepts, 20].
    extras: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


def corpus_sha256(corpus: Corpus) -> str:
    """A hash of every text and its concept: changes when any training input changes."""
    h = hashlib.sha256()
    for t in corpus.texts:
        h.update(f"{t.kind}\0{t.concept}\0{t.text}\n".encode())
    return h.hexdigest()


def plan(corpus: Corpus, config: TrainConfig) -> tuple[Path, list[int], int]:
    """Validate everything cheap; return (model path, layers, num_layers). Prints layer depths."""
    if config.method not in METHODS:
        raise AmygdalaError(f"--method {config.method!r}; choose one of {', '.join(METHODS)}")
    check_params(config.method, config.method_params)
    corpus.require_positives(config.min_positives)
    path = resolve_model(config.model)
    info = model_info(path)
    layers = parse_layers(config.layers, info.num_layers)
    depths = ", ".join(f"{l} ({relative_depth(l, info.num_layers):.0%})" for l in layers)
    log.warning("model %s: %d layers, hidden %d; target layers %s", info.name, info.num_layers, info.hidden_size, depths)
    return path, layers, info.num_layers


def neutral_statistics(
    vectors: dict[int, torch.Tensor], tokens: dict[int, list[torch.Tensor]]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Mean and std of per-token projections over neutral text, per layer and concept."""
    mean, std = {}, {}
    for l, v in vectors.items():
        proj = torch.cat(tokens[l]) @ v.T
        mean[l], std[l] = proj.mean(0), proj.std(0)
    return mean, std


def train(corpus: Corpus, config: TrainConfig, out: str | Path | None = None, loaded=None) -> TrainResult:
    """Train concept vectors on ``corpus`` and (when ``out`` is given) write the readout file.

    ``loaded`` is an already loaded ``(model, tokenizer, info)`` to reuse.
    """
    path, layers, num_layers = plan(corpus, config)
    model, tokenizer, info = loaded or load_model(path, config.device)
    neutral = {t.text for t in corpus.neutral_texts()} or {t.text for t in corpus.texts}
    if not corpus.neutral_texts():
        log.warning("corpus has no baselines or direct/_*.txt: z-score statistics use all texts")
    neutral_tokens: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    texts = [t.text for t in corpus.texts]
    unique = list(dict.fromkeys(texts))
    neutral_rows = {i for i, t in enumerate(unique) if t in neutral}

    def keep_neutral(row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        # Position 0 is the attention sink: its residual norm is an outlier, not neutral text.
        if row in neutral_rows:
            neutral_tokens[layer].append(matrix[1 if start == 0 else 0 :].float().cpu())

    # Per-token methods (subspace) accumulate each text's token rowspace in the same forward,
    # on the model's device, so no text runs twice and no token matrix is kept.
    params = check_params(config.method, config.method_params)
    tokens = None
    if METHODS[config.method].needs_tokens:
        tokens = TokenSubspaces(layers, info.hidden_size, next(model.parameters()).device)

    def on_tokens(row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        keep_neutral(row, layer, matrix, start)
        if tokens is not None:
            tokens.add(row, layer, matrix, start)

    acts = collect(
        model, tokenizer, unique, layers,
        batch_size=config.batch_size, chat_template=config.chat_template,
        on_tokens=on_tokens, progress=config.progress,
        sites=projection_sites(model, layers) if config.quality_sites else None,
    )
    sets = concept_sets(corpus, acts)
    fitted = fit(config.method, acts, sets, tokens=tokens, **params)
    vectors = fitted.vectors
    mean, std = neutral_statistics(vectors, neutral_tokens)
    readout = Readout(
        concepts=list(corpus.concepts),
        layers=layers,
        vectors=vectors,
        mean=mean,
        std=std,
        meta={
            "dtype": config.dtype,
            "model": {"name": info.name, "num_layers": num_layers},
            "pooling": "last_content_token",
            "method": config.method,
            "method_params": params,
            "chat_template": config.chat_template,
            "corpus": {"path": str(corpus.root) if corpus.root else None, "sha256": corpus_sha256(corpus)},
            "clusters": [corpus.concept_cluster[c] for c in corpus.concepts],
        },
    )
    if out is not None:
        readout.save(out)
    return TrainResult(readout, acts, model, tokenizer, fitted.extras)
