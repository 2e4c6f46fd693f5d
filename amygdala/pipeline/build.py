"""``amygdala build``: concept vectors from a corpus, written as a readout file.

Everything that can fail without the model is checked before it loads: the corpus, the concept
selection, the minimum positives, the method and its parameters, the pooling, the layers against
the model's config. A model load costs minutes on a large model; a typo should cost seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from amygdala import AmygdalaError
from amygdala.activations import DEFAULT_POOLING, Activations, Pooling, collect, distinct
from amygdala.corpus import Corpus
from amygdala.methods import METHODS, TokenSubspaces, check_corpus_fits, check_params, concept_sets, fit
from amygdala.models import load_model, model_info, parse_layers, relative_depth, resolve_model
from amygdala.models.layers import projection_sites
from amygdala.models.weights import weight_record
from amygdala.readout import Readout
from amygdala.readout.construction import TokenMoments, remove_shared, valence_direction

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from amygdala.methods import ConceptSets
    from amygdala.models import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """Options of ``amygdala build``; the defaults are the CLI's. Every one is checked by
    :func:`plan` before the model loads, and a bad one raises naming the field (``layers``).

    Args:
        model: model folder or ``"default"`` (SmolLM2-135M-Instruct).
        layers: layer indices (``"10,15"``, negative from the end) or relative depths (``"0.5,0.66"``).
        method: a name of :data:`amygdala.methods.METHODS` (docs/methods.md).
        method_params: the method's parameters (``{"C": 0.1}``); strings are converted.
        pooling: which tokens make a text's row: ``last``, ``mean``, ``mean_from=K``.
        min_positives: fail when a concept has fewer positive texts.
        chat_template: read texts as the assistant turn of a chat.
        batch_size: texts per forward.
        device: torch device, ``None`` for cuda when available.
        dtype: dtype of the stored vectors, ``float32`` or ``float16``.
        construction: ``mean_removed`` or ``as_built`` (below).
        statistics: the z-scores' default statistics (below).
        progress: show a progress bar.
        quality_sites: also pool the projections the quality report reads (below).
    """

    model: str | None = "default"
    layers: str = "0.5,0.66"
    method: str = "diffmean"
    method_params: dict = field(default_factory=dict)
    pooling: str = DEFAULT_POOLING
    min_positives: int = 3
    chat_template: bool = False
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    #: The model weights' dtype (``--model-dtype``; None: fp32 on CPU, bf16 on GPU); ``dtype`` is the stored vectors'.
    model_dtype: str | None = None
    #: ``mean_removed`` (default): the concept vectors' shared direction taken out and kept as the
    #: emotionality track (readout/construction.py says why); ``as_built``: the method's vectors as they are.
    construction: str = "mean_removed"
    #: Which statistics z-scores use unless told (``neutral`` / ``emotional``); both are stored.
    statistics: str = "emotional"
    progress: bool = True
    #: Also pool the attention output and MLP down projections' inputs in the same forward
    #: (``activations.sites``), for the quality report (``build --quality-report``).
    quality_sites: bool = False


@dataclass
class BuildResult:
    readout: Readout
    activations: Activations
    model: object
    tokenizer: object
    #: Per-method by-products, per name and layer, e.g. ``subspace_eigenvalues`` [n_concepts, 20].
    extras: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What a checked configuration resolved to, before any model loads."""

    model_path: Path
    layers: list[int]
    num_layers: int
    hidden_size: int
    params: dict
    pooling: Pooling


def plan(corpus: Corpus, config: BuildConfig) -> Plan:
    """Validate everything cheap and resolve it. Logs the target layers' relative depths."""
    params = check_params(config.method, config.method_params)
    check_corpus_fits(config.method, corpus)  # e.g. denoised on one concept's pairs: fail before the model loads
    pooling = Pooling.parse(config.pooling)
    corpus.require_positives(config.min_positives)
    path = resolve_model(config.model)
    info = model_info(path)
    layers = parse_layers(config.layers, info.num_layers)
    depths = ", ".join(f"{l} ({relative_depth(l, info.num_layers):.0%})" for l in layers)
    log.warning("model %s: %d layers, hidden %d; target layers %s", info.name, info.num_layers, info.hidden_size, depths)
    return Plan(path, layers, info.num_layers, info.hidden_size, params, pooling)


def matching_model(readout: Readout, model: str | None = "default") -> ModelInfo:
    """The model's :class:`~amygdala.models.ModelInfo`, after checking from its config alone (no
    weights loaded) that ``readout`` was built for a model of its shape."""
    info = model_info(resolve_model(model))
    readout.check_model(info.num_layers, info.hidden_size, info.name)
    return info


class TokenStats:
    """Per-token moments of the neutral texts' and of the emotional texts' activations, gathered in
    the build forward: the readout reads every token, so its z-score statistics are measured per
    token too, never on pooled rows, and both sets ("neutral": more X than plain prose?;
    "emotional": X rather than another feeling?) come from the same pass. Only the moments are
    kept ([h, h] per layer and set), never the tokens; the file stores the per-direction results."""

    def __init__(self, neutral_rows: set[int], layers: list[int], hidden: int):
        self.rows = neutral_rows
        self.neutral = {l: TokenMoments(hidden) for l in layers}
        self.emotional = {l: TokenMoments(hidden) for l in layers}

    def add(self, row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        # Position 0 is the attention sink: its residual norm is an outlier, not text.
        tokens = matrix[1 if start == 0 else 0 :]
        if tokens.shape[0]:
            (self.neutral if row in self.rows else self.emotional)[layer].add(tokens)

    def statistics(self, vectors: dict[int, torch.Tensor], against: str = "neutral") -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None:
        """Mean and std of the per-token projections, per layer and direction; ``None`` when the
        set saw no tokens."""
        moments = self.neutral if against == "neutral" else self.emotional
        if any(moments[l].count == 0 for l in vectors):
            return None
        mean, std = {}, {}
        for l, v in vectors.items():
            m, s = moments[l].mean_std(v)
            mean[l], std[l] = m.float(), s.float()
        return mean, std


#: Kept for callers of the old name: the neutral half of :class:`TokenStats`.
NeutralTokens = TokenStats


def collect_corpus(
    corpus: Corpus, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layers: list[int], *,
    pooling: Pooling | str = DEFAULT_POOLING,
    chat_template: bool = False, batch_size: int = 16, progress: bool = True, tokens: TokenSubspaces | None = None,
    neutral: bool = True, sites: dict | None = None,
) -> tuple[Activations, TokenStats | None]:
    """The one forward over the corpus's texts: pooled rows, and in the same pass the neutral
    texts' per-token activations (``neutral``) and per-token bases (``tokens``)."""
    unique = distinct(corpus.text_list())  # collect's rows, to find the neutral ones as they pass
    stats = None
    if neutral:
        neutral_set = {t.text for t in corpus.neutral_texts()}
        if not neutral_set:
            log.warning("corpus has no neutral texts (baselines, direct/_*.txt, neutral/): z-score statistics use all texts")
            neutral_set = set(unique)
        hidden = model.config.get_text_config().hidden_size
        stats = TokenStats({i for i, t in enumerate(unique) if t in neutral_set}, layers, hidden)

    def on_tokens(row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        if stats is not None:
            stats.add(row, layer, matrix, start)
        if tokens is not None:
            tokens.add(row, layer, matrix, start)

    acts = collect(
        model, tokenizer, unique, layers, batch_size=batch_size, chat_template=chat_template, pooling=pooling,
        on_tokens=on_tokens if (stats is not None or tokens is not None) else None, progress=progress, sites=sites,
    )
    return acts, stats


def neutral_statistics(
    corpus: Corpus, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vectors: dict[int, torch.Tensor], *,
    chat_template: bool = False,
    batch_size: int = 16, progress: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The z-score statistics of ``vectors`` ([n, hidden] per layer) over the corpus's neutral
    texts, per token as :func:`build` measures them, with a forward over those texts only: for
    vectors that did not come from a build (an imported concept), so they read on the built
    concepts' scale."""
    texts = distinct([t.text for t in corpus.neutral_texts()]) or distinct(corpus.text_list())
    hidden = int(next(iter(vectors.values())).shape[-1])
    stats = TokenStats(set(range(len(texts))), sorted(vectors), hidden)
    collect(model, tokenizer, texts, sorted(vectors), batch_size=batch_size, chat_template=chat_template,
            on_tokens=stats.add, progress=progress)
    measured = stats.statistics(vectors)
    if measured is None:
        raise AmygdalaError(f"{corpus.root}: no neutral text has a token past the first; z-score statistics need some")
    return measured


def build(
    corpus: Corpus, config: BuildConfig, out: str | Path | None = None,
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo] | None = None,
) -> BuildResult:
    """Build concept vectors on ``corpus`` and (when ``out`` is given) write the readout file.

    Args:
        corpus: the texts (:func:`amygdala.corpus.load_corpus`), already reduced to the concepts wanted.
        config: the options; all checked before the model loads.
        out: folder for ``readout.safetensors`` + ``readout.json`` (``None``: not written).
        loaded: an already loaded ``(model, tokenizer, info)`` to reuse instead of loading ``config.model``.

    Returns:
        The :class:`BuildResult`: the readout, the corpus's pooled activations, the model and
        tokenizer used, and the method's by-products.

    Raises:
        AmygdalaError: a bad option, a concept with too few positives, a corpus without usable
            neutral tokens; each names the field or file at fault.
    """
    p = plan(corpus, config)
    model, tokenizer, info = loaded or load_model(p.model_path, config.device, config.model_dtype)
    # Per-token methods (subspace) accumulate each text's token rowspace in the same forward,
    # on the model's device, so no text runs twice and no token matrix is kept.
    tokens = None
    if METHODS[config.method].needs_tokens:
        tokens = TokenSubspaces(p.layers, info.hidden_size, next(model.parameters()).device)
    acts, neutral = collect_corpus(
        corpus, model, tokenizer, p.layers, pooling=p.pooling, chat_template=config.chat_template,
        batch_size=config.batch_size, progress=config.progress, tokens=tokens,
        sites=projection_sites(model, p.layers) if config.quality_sites else None,
    )
    sets = concept_sets(corpus, acts)
    fitted = fit(config.method, acts, sets, tokens=tokens, **p.params)
    vectors, tracks, names = construct(fitted.vectors, config.construction, acts, sets, corpus.valence())
    if neutral is None:  # collect_corpus(neutral=True) always measures: not reachable
        raise AmygdalaError("the corpus forward measured no statistics")
    measured = neutral.statistics(vectors)
    if measured is None:
        raise AmygdalaError(f"{corpus.root}: no neutral text has a token past the first; z-score statistics need some")
    mean, std = measured
    emotional = neutral.statistics(vectors, "emotional")
    track_stats = neutral.statistics(tracks) or ({}, {})  # the same moments as measured: never None here
    readout = Readout(
        concepts=list(corpus.concepts),
        layers=p.layers,
        vectors=vectors,
        mean=mean,
        std=std,
        emotional_mean=emotional[0] if emotional else None,
        emotional_std=emotional[1] if emotional else None,
        track_names=names,
        track_vectors=tracks,
        track_mean=track_stats[0],
        track_std=track_stats[1],
        meta={
            "construction": config.construction,
            "statistics": {"default": config.statistics if emotional else "neutral"},
            "dtype": config.dtype,
            "model": {"name": info.name, "num_layers": p.num_layers,
                      "weights": weight_record(info.path, str(next(model.parameters()).dtype).removeprefix("torch."))},
            "pooling": str(p.pooling),
            "method": config.method,
            "method_params": p.params,
            "chat_template": config.chat_template,
            "corpus": {"path": str(corpus.root) if corpus.root else None, "sha256": corpus.sha256()},
            # What the model card (readout/card.py) shows under "Rebuild".
            "command": rebuild_command(corpus, config, p.layers, out),
            "clusters": corpus.cluster_of(),
            # Per concept, for readers that show the vectors (the page colours tokens by valence).
            "valence": corpus.valence(),
            "arousal": corpus.arousal(),
            "descriptions": [corpus.descriptions.get(c, "") for c in corpus.concepts],
            **_fit_notes(fitted.extras),
        },
    )
    if out is not None:
        readout.save(out)
    return BuildResult(readout, acts, model, tokenizer, fitted.extras)


CONSTRUCTIONS = ("mean_removed", "as_built")


def rebuild_command(corpus: Corpus, config: BuildConfig, layers: list[int], out: str | Path | None) -> str:
    """The ``amygdala build`` command line that builds this readout again: every option that
    changes the vectors, paths absolute (the card travels with the folder, not the shell it was
    made in), layers as the indices they resolved to, concepts in order. Device and batch
    size are left to the rebuilder's machine (they change floating-point rounding only)."""
    import shlex

    argv = ["amygdala", "build"]
    root = Path(corpus.root).resolve() if corpus.root else None
    if root is not None and root.is_file():  # a --pairs FILE.jsonl corpus
        argv += ["--pairs", str(root)]
    else:
        if root is not None:
            argv += ["--corpus", str(root)]
        # Where the direct descriptions came from: the corpus's own direct/ folder, or another (--direct-dir).
        dirs = {t.path.parent.resolve() for t in corpus.texts
                if t.kind == "direct" or (t.kind == "neutral" and t.path.name.startswith("_"))}
        own = root / "direct" if root is not None else None
        if own is not None and own.is_dir() and own.resolve() not in dirs:
            argv.append("--no-direct")
        argv += [a for d in sorted(dirs - {own.resolve() if own else None}) for a in ("--direct-dir", str(d))]
    model = config.model or "default"
    argv += ["--model", str(Path(model).resolve()) if Path(model).exists() else model]
    if config.model_dtype:
        argv += ["--model-dtype", config.model_dtype]
    argv += ["--layers", ",".join(str(l) for l in layers), "--method", config.method]
    for k, v in check_params(config.method, config.method_params).items():
        argv += ["--method-param", f"{k}={v}"]
    argv += ["--pooling", str(Pooling.parse(config.pooling)), "--construction", config.construction,
             "--statistics", config.statistics, "--dtype", config.dtype, "--concepts", ",".join(corpus.concepts)]
    if config.chat_template:
        argv.append("--chat-template")
    argv += ["--out", str(Path(out).resolve()) if out is not None else "OUT"]
    return shlex.join(argv)


def construct(
    fitted: dict[int, torch.Tensor], construction: str, acts: Activations, sets: ConceptSets, valence: list[float | None],
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list[str]]:
    """The readout's concept vectors and tracks per layer from the method's vectors.

    Tracks: ``emotionality``, the unit mean of the concept vectors (what every concept shares:
    emotional story vs neutral text), and ``valence`` where the corpus has concepts of both signs:
    :func:`~amygdala.readout.construction.valence_direction` of the pooled rows of positive-valence
    concepts' texts against negative-valence ones' (both emotional, so the shared direction does not
    separate them; the valence-weighted mean of concept z-scores was near chance).
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction {construction!r}: expected one of {', '.join(CONSTRUCTIONS)}")
    pos_rows = sorted({int(r) for c, v in enumerate(valence) if v is not None and v > 0 for r in sets.positives[c]})
    neg_rows = sorted({int(r) for c, v in enumerate(valence) if v is not None and v < 0 for r in sets.positives[c]})
    both = set(pos_rows) & set(neg_rows)  # a text that is positive for both signs says nothing of valence
    pos_rows = [r for r in pos_rows if r not in both]
    neg_rows = [r for r in neg_rows if r not in both]
    names = ["emotionality"] + (["valence"] if pos_rows and neg_rows else [])
    vectors, tracks = {}, {}
    for l, v in fitted.items():
        if v.shape[0] >= 2:
            centred, shared = remove_shared(v)
        else:  # one concept: nothing is shared with another; its own direction is the track
            centred, shared = v, v[0] / v[0].norm().clamp_min(1e-12)
        vectors[l] = centred if construction == "mean_removed" else v
        rows = [shared]
        if len(names) == 2:
            rows.append(valence_direction(acts.pooled[l], pos_rows, neg_rows))
        tracks[l] = torch.stack(rows).float()
    return vectors, tracks, names


def _fit_notes(extras: dict[str, dict[int, torch.Tensor]]) -> dict:
    """Small per-layer facts a method reports (e.g. how many neutral components ``denoised``
    removed), kept in readout.json so a reader knows what the vectors went through."""
    notes = {name: {str(l): int(t.reshape(-1)[0]) for l, t in per_layer.items()}
             for name, per_layer in extras.items() if name.endswith("_removed")}
    return {"method_notes": notes} if notes else {}
