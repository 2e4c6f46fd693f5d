"""A request's ``readout`` and ``steer`` fields: parsed and checked in the API server.

Everything is checked here, before the request reaches the engine, so a bad request is a 400
that names the field (and, for an unknown concept, the nearest valid names) and never disturbs
the batch. The worker receives the checked spec as plain JSON in ``SamplingParams.extra_args``
(:meth:`RequestSpec.wire`) and only turns it into tensors.

Request fields (top level, or the same keys inside ``vllm_xargs``, where ``steer`` is the list
as a JSON string because vLLM only allows scalars and flat lists there)::

    "readout": true | false | "raw" | "zscore"       (default: true when a readout is loaded)
             | {"mode": "raw" | "zscore", "concepts": [...], "clusters": [...], "layers": [...],
                "top_k": K, "summary": true}           (a filter: amygdala.readout.filter; in
                                                        vllm_xargs the object as a JSON string)
    "readout_prompt": true | false                    (default: false; the prompt's tokens too)
    "steer": [{"concept": "calm", "strength": 4.0, "layers": [15, 20]},
              {"vector": [...hidden floats...], "strength": -2.0,
               "positions": "generated", "from_token": 12}]

``positions`` ("all" default, "generated", "prompt") and ``from_token`` (steer positions >= it)
place a term as :class:`amygdala.readout.Steering` does (:data:`amygdala.readout.runtime.POSITIONS`).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass

from amygdala.fields import FieldError, finite, is_int, short
from amygdala.readout import Readout, ReadoutError
from amygdala.readout.filter import ReadoutFilter
from amygdala.readout.runtime import MAX_POSITION, POSITIONS
from amygdala.serve.config import DEFAULT_STEER_ENV

FIELDS = ("readout", "steer", "readout_prompt")
_ON = {"true", "1", "on", "yes", "raw"}
_OFF = {"false", "0", "off", "no", "none"}
_ITEM_KEYS = {"concept", "vector", "strength", "layers", "positions", "from_token"}
#: A raw vector is normalised in float32 by the worker: outside these lengths that overflows or
#: loses its direction, and only the direction counts, so a client can always scale into it.
VECTOR_NORMS = (1e-6, 1e15)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    max_strength: float = math.inf  # the server's bound on |strength| (AMYGDALA_MAX_STEER_STRENGTH)


@dataclass(frozen=True)
class SteerItem:
    """One steering term: a unit direction (a concept's vector, or ``vector`` normalised) times
    ``strength``, added to the residual stream after each of ``layers``."""

    strength: float
    layers: tuple[int, ...]
    concept: str | None = None
    vector: tuple[float, ...] | None = None
    positions: str = "all"
    from_token: int | None = None

    def wire(self) -> dict:
        out: dict = {"strength": self.strength, "layers": list(self.layers)}
        if self.concept is not None:
            out["concept"] = self.concept
        else:
            out["vector"] = list(self.vector or ())
        if self.positions != "all":
            out["positions"] = self.positions
        if self.from_token is not None:
            out["from_token"] = self.from_token
        return out


@dataclass(frozen=True)
class RequestSpec:
    """What one request asks of the plugin: readout mode (None = off) and steering terms."""

    readout: str | None = None
    steer: tuple[SteerItem, ...] = ()
    #: Read the prompt's tokens too, not only the generated ones.
    prompt: bool = False
    #: What of the rows the response carries (None: every concept and layer, as before filters).
    filter: ReadoutFilter | None = None

    @property
    def active(self) -> bool:
        return self.readout is not None or bool(self.steer)

    def wire(self, tag: str | None) -> dict:
        """The JSON the worker gets; ``tag`` names the request's score rows (None: no readout)."""
        out = {"tag": tag if self.readout else None, "steer": [s.wire() for s in self.steer]}
        if self.readout and self.prompt:
            out["prompt"] = True
        return out

    def cache_salt(self, user_salt: str | None) -> str | None:
        """The prefix-cache salt: the user's own unless steered or reading the prompt.

        vLLM hashes the salt into every KV block of the request, so steered KV is reused only by
        requests with the same salt and the same steering, whose KV is the same. A prompt
        readout needs every prompt position computed, which a cache hit would skip, so such a
        request gets a salt of its own (its KV is then reused by no other request).

        Placed steering ("generated", ``from_token``) is salted the same, though its prompt KV is
        the unsteered KV: vLLM puts the salt in the first block's hash only and chains the rest
        from it, so there is no salting from a position on, and vLLM also caches the blocks of
        generated tokens. An unsalted generated-only request would leave steered blocks of its
        reply that an unsteered follow-up (the same conversation, one turn on) would reuse as
        its own. The placement is part of the salt (:meth:`SteerItem.wire`).
        """
        if not self.steer and not self.prompt:
            return user_salt
        nonce = secrets.token_hex(8) if self.prompt else None
        payload = json.dumps([user_salt, [s.wire() for s in self.steer], nonce], sort_keys=True)
        return "amygdala-" + hashlib.sha256(payload.encode()).hexdigest()[:40]


def parse(
    fields: dict, xargs: dict | None, readout: Readout | None, shape: ModelShape,
    default_steer: tuple[SteerItem, ...] = (),
) -> RequestSpec:
    """The spec of a request from its extra top-level ``fields`` and its ``vllm_xargs``.

    Top-level fields win over the same keys in ``vllm_xargs``. A request without ``steer`` (or
    with ``null``) gets ``default_steer``, the server's (:func:`default_steering`); its own
    ``steer``, an empty list included, replaces it.
    """
    merged = {k: v for k, v in (xargs or {}).items() if k in FIELDS}
    merged.update({k: v for k, v in fields.items() if k in FIELDS})
    fields_, filt = _parse_filter(merged, readout)
    mode = _parse_readout(fields_, readout)
    given = merged.get("steer")
    steer = default_steer if given is None else _parse_steer(given, readout, shape)
    return RequestSpec(mode, steer, _parse_prompt(merged.get("readout_prompt"), mode), filt if mode else None)


def default_steering(text: str | None, readout: Readout | None, shape: ModelShape) -> tuple[SteerItem, ...]:
    """The server-wide steering from ``AMYGDALA_DEFAULT_STEER`` (``amygdala serve --steer``),
    checked as a request's ``steer`` is, so that an unmodified OpenAI client or eval harness
    measures the steered model; a bad value names the variable and the item."""
    if not text:
        return ()
    try:
        return _parse_steer(text, readout, shape)
    except FieldError as e:
        raise FieldError(f"{DEFAULT_STEER_ENV} {e.path}", e.message) from None


def _parse_prompt(value, mode: str | None) -> bool:
    if value is None:
        return False
    key = str(value).strip().lower()
    if key not in _ON | _OFF or key == "raw":
        raise FieldError("readout_prompt", f"expected true or false, got {value!r}")
    if key in _OFF:
        return False
    if mode is None:
        raise FieldError("readout_prompt", "reads the prompt's tokens with the readout, which this request turns off")
    return True


_FILTER_KEYS = {"mode", "concepts", "clusters", "layers", "top_k", "summary"}


def _parse_filter(fields: dict, readout: Readout | None) -> tuple[dict, ReadoutFilter | None]:
    """A ``readout`` object split into its mode (put back as a plain ``readout`` value for
    :func:`_parse_readout`) and its filter; anything else passes through unchanged. An object
    without filter keys (only ``mode``) is no filter: the response is then the plain mode's."""
    value = fields.get("readout")
    if isinstance(value, str) and value.lstrip().startswith("{"):  # vllm_xargs: the object as JSON
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise FieldError("readout", f"not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    if not isinstance(value, dict):
        return fields, None
    unknown = sorted(str(k) for k in set(value) - _FILTER_KEYS)
    if unknown:
        raise FieldError("readout", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FILTER_KEYS))}")
    plain = {**fields, "readout": value.get("mode", True)}
    if _parse_readout(plain, readout) is None or readout is None:
        return plain, None  # readout off: nothing to filter
    names = {key: _names(f"readout.{key}", value.get(key)) for key in ("concepts", "clusters")}
    layers = value.get("layers")
    if layers is not None and not (isinstance(layers, list) and layers and all(is_int(l) for l in layers)):
        raise FieldError("readout.layers", f"must be a non-empty list of the readout's layers {readout.layers}, got {short(layers)}")
    summary = value.get("summary", False)
    if not isinstance(summary, bool):
        raise FieldError("readout.summary", f"expected true or false, got {short(summary)}")
    if not (names["concepts"] or names["clusters"] or layers or "top_k" in value or summary):
        return plain, None
    if summary and "top_k" in value:
        raise FieldError("readout.top_k", "picks per-token rows, which summary replaces; give one of them")
    filt = ReadoutFilter.build(readout, concepts=names["concepts"], clusters=names["clusters"], layers=layers,
                               top_k=value.get("top_k"), summary=summary,
                               where={k: f"readout.{k}" for k in ("concepts", "clusters", "layers", "top_k")})
    return plain, filt


def _names(where: str, value) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise FieldError(where, f"must be a non-empty list of names, got {short(value)}")
    return value


def _parse_readout(fields: dict, readout: Readout | None) -> str | None:
    if "readout" not in fields:
        return "raw" if readout is not None else None
    value = fields["readout"]
    # words, booleans and 0/1 only: str() of any other value (a 5000-digit integer raises) means nothing here
    plain = value is None or isinstance(value, (str, bool)) or (is_int(value) and value in (0, 1))
    key = str(value).strip().lower() if plain else ""
    if key in _OFF:
        return None
    if key in _ON:
        mode = "raw"
    elif key in ("zscore", "z"):
        mode = "zscore"
    else:
        raise FieldError("readout", f"expected true, false, 'raw' or 'zscore', got {short(value) if plain else type(value).__name__}")
    if readout is None:
        raise FieldError("readout", "this server has no readout file loaded (start it with AMYGDALA_READOUT)")
    if mode == "zscore" and not readout.has_stats:
        raise FieldError("readout", "'zscore' needs the readout file's neutral-text statistics, which it lacks")
    return mode


def _parse_steer(value, readout: Readout | None, shape: ModelShape) -> tuple[SteerItem, ...]:
    if value is None or value == [] or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise FieldError("steer", f"not valid JSON ({getattr(e, 'msg', 'nested too deeply')}); give a list of "
                             "steering objects") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FieldError("steer", f"expected a list of {{concept|vector, strength, layers}} objects, got {type(value).__name__}")
    if readout is None:
        raise FieldError("steer", "this server has no readout file loaded (start it with AMYGDALA_READOUT)")
    return tuple(_parse_item(i, item, readout, shape) for i, item in enumerate(value))


def _parse_item(i: int, item, readout: Readout, shape: ModelShape) -> SteerItem:
    where = f"steer[{i}]"
    if not isinstance(item, dict):
        raise FieldError(where, f"expected an object with concept or vector, strength and layers, got {short(item)}")
    unknown = sorted(set(item) - _ITEM_KEYS)
    if unknown:
        raise FieldError(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_ITEM_KEYS))}")
    strength = finite(item.get("strength"))
    if strength is None or abs(strength) > shape.max_strength:
        raise FieldError(f"{where}.strength", f"must be a number within +-{shape.max_strength:g} (this server's "
                        f"AMYGDALA_MAX_STEER_STRENGTH), got {short(item.get('strength'))}")
    has_concept, has_vector = "concept" in item, "vector" in item
    if has_concept == has_vector:
        raise FieldError(where, "give exactly one of concept (a name) or vector (hidden-size floats)")
    concept = vector = None
    if has_concept:
        concept = item["concept"]
        if not isinstance(concept, str):
            raise FieldError(f"{where}.concept", f"must be a concept name, got {concept!r}")
        try:
            readout.concept_index(concept)
        except ReadoutError as e:
            raise FieldError(f"{where}.concept", str(e)) from None
    else:
        vector = _parse_vector(f"{where}.vector", item["vector"], shape.hidden_size)
    layers = _parse_layers(f"{where}.layers", item.get("layers"), readout, shape, needs_readout_layer=has_concept)
    positions = item.get("positions", "all")
    if positions not in POSITIONS:
        raise FieldError(f"{where}.positions", f"must be one of {', '.join(POSITIONS)}, got {short(positions)}")
    from_token = item.get("from_token")
    if from_token is not None and not (is_int(from_token) and 0 <= from_token <= MAX_POSITION):
        raise FieldError(f"{where}.from_token", f"must be a whole number 0..{MAX_POSITION} (a position in the whole "
                         f"sequence, prompt included), got {short(from_token)}")
    return SteerItem(strength, layers, concept, vector, positions, from_token)



def _parse_vector(where: str, value, hidden: int) -> tuple[float, ...]:
    numbers = [finite(x) for x in value] if isinstance(value, list) else [None]
    if None in numbers:
        raise FieldError(where, f"must be a list of {hidden} finite numbers")
    if len(numbers) != hidden:
        raise FieldError(where, f"has {len(numbers)} numbers; this model's hidden size is {hidden}")
    if not any(numbers):
        raise FieldError(where, "is all zeros; it has no direction")
    norm = math.hypot(*numbers)
    if not VECTOR_NORMS[0] <= norm <= VECTOR_NORMS[1]:
        raise FieldError(where, f"has length {norm:.3g}, outside {VECTOR_NORMS[0]:g}..{VECTOR_NORMS[1]:g}; scale it "
                        "(only its direction is used)")
    return tuple(numbers)


def _parse_layers(where: str, value, readout: Readout, shape: ModelShape, *, needs_readout_layer: bool) -> tuple[int, ...]:
    if value is None:
        return tuple(readout.layers)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(l, int) and not isinstance(l, bool) for l in value):
        raise FieldError(where, f"must be a non-empty list of layer indices, got {short(value)}")
    n = shape.num_layers
    out = []
    for l in value:
        idx = l + n if l < 0 else l
        if not 0 <= idx < n:
            raise FieldError(where, f"layer {short(l)} out of range; this model has layers 0-{n - 1}")
        if needs_readout_layer and idx not in readout.vectors:
            raise FieldError(where, f"layer {l}: concept vectors exist only at the readout's layers {readout.layers}")
        out.append(idx)
    return tuple(sorted(set(out)))
