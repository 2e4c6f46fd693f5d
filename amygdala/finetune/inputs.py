"""What a training job takes, checked field by field: samples of token IDs and a job config.

Why plain functions over JSON-like values: the HTTP route (``POST /train``) and Python callers
share them, and a bad request must fail before anything touches the weights, with one error
that names the field (``samples[3].continuation_ids[5]``) and what to do. The route maps
:class:`FieldError` to a 400 with its ``path`` as the parameter.

No tokenizer here: the client owns tokenization and sends token IDs. The loss is taken on the
continuation only; ``context_ids`` condition it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from amygdala import AmygdalaError
from amygdala.fields import FieldError, finite, is_int, short

OBJECTIVES = ("sft", "orpo", "dpo", "dpop")
#: The objectives that compare the continuation with a rejected one.
PAIRED = ("orpo", "dpo", "dpop")
SAMPLE_KEYS = ("context_ids", "continuation_ids", "rejected_ids")
#: Upper bounds of the objectives' weights. DPO papers use beta 0.1-0.5 and ORPO lambda 0.1-1;
#: 10 is far past both, and keeps the gradient (which scales with them) from overflowing: a
#: beta of 1e37 gave a finite first loss and an infinite backward.
MAX_BETA = 10.0
MAX_ORPO_LAMBDA = 10.0
#: Upper bounds of the anchor's and DPOP's weights: far past the useful range (a KL weight of
#: 0.01-1, DPOP's paper 50 on summed log-probs), and low enough that the gradient stays finite.
MAX_ANCHOR = 100.0
MAX_DPOP_LAMBDA = 100.0
MAX_PATIENCE = 100

@dataclass(frozen=True)
class Sample:
    """One example: the continuation (preferred) and, for orpo/dpo, the rejected one after a context."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class JobConfig:
    """A job's settings. ``steps`` optimizer updates, each over all samples (gradients of
    ``micro_batch`` samples per forward accumulate into one update)."""

    objective: str = "sft"
    learning_rate: float = 1e-5
    steps: int = 1
    beta: float = 0.1  # DPO: strength of the preference relative to the reference
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term next to the SFT term
    micro_batch: int = 8
    #: DPOP: weight of max(0, log ref(preferred) - log pi(preferred)). 1 is well above DPO's
    #: gradient on the preferred log-prob (at most beta), so a falling preferred likelihood is
    #: pushed back as soon as it drops below the start.
    dpop_lambda: float = 1.0
    #: Weight of the KL to the job's starting weights (objectives.py); 0 (off) keeps the
    #: objectives as they were: a sweep, not this default, should say which weight to use.
    anchor: float = 0.0
    #: The held neutral sequences (token IDs) the anchor also applies to, e.g. plain text.
    neutral: tuple[tuple[int, ...], ...] = ()
    #: Share of the samples held out for early stopping; 0 (off) runs all ``steps``.
    holdout: float = 0.0
    #: Early stop after the held-out loss rose this many evaluations in a row (then the best
    #: step's weights are put back). 2: one noisy rise does not stop a job.
    patience: int = 2


@dataclass(frozen=True)
class Limits:
    """What the model allows: IDs below ``vocab_size``, at most ``max_length`` tokens per sequence."""

    vocab_size: int
    max_length: int
    max_samples: int = 4096
    max_steps: int = 10_000
    #: Padded tokens in one forward (rows x longest sequence; orpo/dpo run preferred and rejected
    #: as 2 rows): bounds the activations and the logits (rows x positions x vocab floats).
    max_batch_tokens: int = 8192

    @classmethod
    def from_config(cls, config) -> Limits:
        """From a transformers config (its text part for multimodal wrappers)."""
        text = getattr(config, "get_text_config", lambda: config)()
        length = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if length is None:
            raise AmygdalaError(f"{type(config).__name__}: no max_position_embeddings; cannot bound sample length")
        return cls(vocab_size=int(text.vocab_size), max_length=int(length))


def _ids(value: Any, field: str, limits: Limits, *, allow_empty: bool = False) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise FieldError(field, f"expected a list of token IDs (integers), got {type(value).__name__}")
    if not value and not allow_empty:
        raise FieldError(field, "empty; give at least one token ID")
    for i, t in enumerate(value):
        if not is_int(t):
            raise FieldError(f"{field}[{i}]", f"{short(t)} is not an integer token ID")
        if not 0 <= t < limits.vocab_size:
            raise FieldError(f"{field}[{i}]", f"{short(t)} is outside the vocabulary (0..{limits.vocab_size - 1})")
    return tuple(value)


def parse_sample(raw: Any, index: int, limits: Limits, objective: str) -> Sample:
    where = f"samples[{index}]"
    if not isinstance(raw, dict):
        raise FieldError(where, f"expected an object with {', '.join(SAMPLE_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SAMPLE_KEYS))
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"unknown field; a sample has {', '.join(SAMPLE_KEYS)}")
    for key in SAMPLE_KEYS[:2]:
        if key not in raw:
            raise FieldError(f"{where}.{key}", "missing")
    context = _ids(raw["context_ids"], f"{where}.context_ids", limits)
    continuation = _ids(raw["continuation_ids"], f"{where}.continuation_ids", limits)
    rejected = None
    if objective in PAIRED:
        if raw.get("rejected_ids") is None:
            raise FieldError(f"{where}.rejected_ids", f"missing; objective {objective} compares the continuation with a rejected one")
        rejected = _ids(raw["rejected_ids"], f"{where}.rejected_ids", limits)
    elif raw.get("rejected_ids") is not None:
        raise FieldError(f"{where}.rejected_ids", "only objectives orpo, dpo and dpop use it; drop it or choose one of them")
    for key, ids in (("continuation_ids", continuation), ("rejected_ids", rejected)):
        if ids is not None and len(context) + len(ids) > limits.max_length:
            raise FieldError(
                f"{where}.{key}",
                f"context + {key.removesuffix('_ids')} is {len(context) + len(ids)} tokens, over the model's "
                f"{limits.max_length}; shorten the context",
            )
    return Sample(context, continuation, rejected)


def parse_config(raw: Any, limits: Limits) -> JobConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FieldError("config", f"expected an object, got {type(raw).__name__}")
    known = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FieldError(f"config.{unknown[0]}", f"unknown setting; known: {', '.join(sorted(known))}")
    cfg = JobConfig(**raw)
    if cfg.objective not in OBJECTIVES:
        raise FieldError("config.objective", f"{cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not ((lr := finite(cfg.learning_rate)) is not None and 0 < lr <= 1):
        raise FieldError("config.learning_rate", f"{short(cfg.learning_rate)} must be a number in (0, 1]; 1e-5 is a usual start")
    if not (is_int(cfg.steps) and 1 <= cfg.steps <= limits.max_steps):
        raise FieldError("config.steps", f"{short(cfg.steps)} must be an integer in 1..{limits.max_steps}")
    if not ((beta := finite(cfg.beta)) is not None and 0 < beta <= MAX_BETA):
        raise FieldError("config.beta", f"{short(cfg.beta)} must be a number in (0, {MAX_BETA:g}]; 0.1 is usual")
    if not ((lam := finite(cfg.orpo_lambda)) is not None and 0 <= lam <= MAX_ORPO_LAMBDA):
        raise FieldError("config.orpo_lambda", f"{short(cfg.orpo_lambda)} must be a number in [0, {MAX_ORPO_LAMBDA:g}]; 0.1 is usual")
    if not (is_int(cfg.micro_batch) and 1 <= cfg.micro_batch <= limits.max_samples):
        raise FieldError("config.micro_batch", f"{short(cfg.micro_batch)} must be an integer in 1..{limits.max_samples}")
    if not ((dpop := finite(cfg.dpop_lambda)) is not None and 0 <= dpop <= MAX_DPOP_LAMBDA):
        raise FieldError("config.dpop_lambda", f"{short(cfg.dpop_lambda)} must be a number in [0, {MAX_DPOP_LAMBDA:g}]; 1 is the default")
    if not ((anchor := finite(cfg.anchor)) is not None and 0 <= anchor <= MAX_ANCHOR):
        raise FieldError("config.anchor", f"{short(cfg.anchor)} must be a number in [0, {MAX_ANCHOR:g}]; 0 is off, 0.1 a gentle start")
    if not ((holdout := finite(cfg.holdout)) is not None and 0 <= holdout < 1):
        raise FieldError("config.holdout", f"{short(cfg.holdout)} must be a number in [0, 1); 0 is off, 0.2 is usual")
    if not (is_int(cfg.patience) and 1 <= cfg.patience <= MAX_PATIENCE):
        raise FieldError("config.patience", f"{short(cfg.patience)} must be an integer in 1..{MAX_PATIENCE}")
    neutral = _neutral(cfg.neutral, limits)
    if neutral and anchor == 0:
        raise FieldError("config.neutral", "only the anchor uses it; give config.anchor > 0 or drop it")
    return replace(cfg, learning_rate=lr, beta=beta, orpo_lambda=lam, dpop_lambda=dpop, anchor=anchor, holdout=holdout,
                   neutral=neutral)


def _neutral(value: Any, limits: Limits) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)):
        raise FieldError("config.neutral", f"expected a list of token-ID lists, got {type(value).__name__}")
    if len(value) > limits.max_samples:
        raise FieldError("config.neutral", f"{len(value)} sequences, over the limit of {limits.max_samples}")
    out = []
    for i, seq in enumerate(value):
        ids = _ids(seq, f"config.neutral[{i}]", limits)
        if not 2 <= len(ids) <= limits.max_length:
            raise FieldError(f"config.neutral[{i}]", f"{len(ids)} tokens; give 2..{limits.max_length} (the KL is taken "
                             "at every position after the first)")
        out.append(ids)
    return tuple(out)


def heldout_count(samples: int, share: float) -> int:
    """How many of ``samples`` a job holds out for ``holdout`` = ``share`` (at least one when on)."""
    return 0 if share == 0 else max(1, round(share * samples))


def split_holdout(samples: list[Sample], share: float) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): the last :func:`heldout_count` samples are held out.

    Why the last and not a random draw: the split is then the caller's to choose and the same
    on every run; the teach commands already put the samples in an order of their own.
    """
    held = heldout_count(len(samples), share)
    return samples[:len(samples) - held], samples[len(samples) - held:]



def batch_shape(samples: list[Sample], objective: str) -> tuple[int, int]:
    """(rows, padded width) of one forward over ``samples``: orpo/dpo/dpop run preferred and rejected together."""
    lengths = [len(s.context_ids) + len(s.continuation_ids) for s in samples]
    if objective in PAIRED:
        lengths += [len(s.context_ids) + len(s.rejected_ids or ()) for s in samples]
    return len(lengths), max(lengths)


def _check_batches(samples: list[Sample], config: JobConfig, limits: Limits) -> None:
    mb = config.micro_batch
    for b in range(0, len(samples), mb):
        rows, width = batch_shape(samples[b : b + mb], config.objective)
        if rows * width > limits.max_batch_tokens:
            raise FieldError(
                "config.micro_batch",
                f"samples {b}..{min(b + mb, len(samples)) - 1} make one forward of {rows} rows x {width} tokens = "
                f"{rows * width}, over the limit of {limits.max_batch_tokens} tokens; lower config.micro_batch "
                "(or shorten those samples)")
    for b in range(0, len(config.neutral), mb):
        chunk = config.neutral[b : b + mb]
        if len(chunk) * max(map(len, chunk)) > limits.max_batch_tokens:
            raise FieldError("config.micro_batch", f"neutral sequences {b}..{b + len(chunk) - 1} make one forward over "
                             f"the limit of {limits.max_batch_tokens} tokens; lower config.micro_batch")


def parse_request(raw: Any, limits: Limits) -> tuple[list[Sample], JobConfig]:
    """``{"samples": [...], "config": {...}}`` -> checked samples and config, or one FieldError."""
    if not isinstance(raw, dict):
        raise FieldError("body", f"expected an object with samples and config, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"samples", "config"})
    if unknown:
        raise FieldError(unknown[0], "unknown field; a training request has samples and config")
    config = parse_config(raw.get("config"), limits)
    samples = raw.get("samples")
    if not isinstance(samples, list) or not samples:
        raise FieldError("samples", "expected a non-empty list of samples")
    if len(samples) > limits.max_samples:
        raise FieldError("samples", f"{len(samples)} samples, over the limit of {limits.max_samples}; split the job")
    parsed = [parse_sample(s, i, limits, config.objective) for i, s in enumerate(samples)]
    if config.holdout and len(parsed) - heldout_count(len(parsed), config.holdout) < 1:
        raise FieldError("config.holdout", f"holding out {config.holdout:g} of {len(parsed)} samples leaves none to "
                         "train on; give more samples or a smaller holdout")
    _check_batches(parsed, config, limits)
    return parsed, config
