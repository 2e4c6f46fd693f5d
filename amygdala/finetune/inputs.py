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

OBJECTIVES = ("sft", "orpo", "dpo")
SAMPLE_KEYS = ("context_ids", "continuation_ids", "rejected_ids")
#: Upper bounds of the objectives' weights. DPO papers use beta 0.1-0.5 and ORPO lambda 0.1-1;
#: 10 is far past both, and keeps the gradient (which scales with them) from overflowing: a
#: beta of 1e37 gave a finite first loss and an infinite backward.
MAX_BETA = 10.0
MAX_ORPO_LAMBDA = 10.0


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
    if objective in ("orpo", "dpo"):
        if raw.get("rejected_ids") is None:
            raise FieldError(f"{where}.rejected_ids", f"missing; objective {objective} compares the continuation with a rejected one")
        rejected = _ids(raw["rejected_ids"], f"{where}.rejected_ids", limits)
    elif raw.get("rejected_ids") is not None:
        raise FieldError(f"{where}.rejected_ids", "only objectives orpo and dpo use it; drop it or choose one of them")
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
    return replace(cfg, learning_rate=lr, beta=beta, orpo_lambda=lam)



def batch_shape(samples: list[Sample], objective: str) -> tuple[int, int]:
    """(rows, padded width) of one forward over ``samples``: orpo/dpo run preferred and rejected together."""
    lengths = [len(s.context_ids) + len(s.continuation_ids) for s in samples]
    if objective in ("orpo", "dpo"):
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
    _check_batches(parsed, config, limits)
    return parsed, config
