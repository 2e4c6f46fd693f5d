"""Run a model over texts once each and capture the residual stream at chosen decoder layers.

Why it is built this way:
- One forward per *unique* text: a concept's positive is every other concept's negative, so a
  naive loop would run each text once per concept.
- The forward stops right after the deepest hooked layer (an exception from its hook), so no
  later layers and no lm_head run.
- Pooling (:mod:`amygdala.activations.pooling`) reads *content* tokens, located by character
  offsets, never a special token: with a chat template the end-of-turn marker looks the same
  for every text, so a vector read there learns nothing about the text.
- Texts are sorted by length before batching so padding stays small; position ids are computed
  from the attention mask so left and right padding give the same activations as no padding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from amygdala import AmygdalaError
from amygdala.activations.pooling import DEFAULT_POOLING, Pooling
from amygdala.models.layers import block_output, find_layers

log = logging.getLogger(__name__)

#: The user turn every text is answered to under ``--chat-template`` (the original system's).
CHAT_PROMPT = "Say something."

#: Called once per text and layer as ``(row, layer, matrix, start)``: the text's content-token
#: activations [n_tokens, hidden] and the sequence position of the first of them.
TokenCallback = Callable[[int, int, torch.Tensor, int], None]


@dataclass(frozen=True)
class Encoded:
    """A tokenized text: ids, and the token range [start, end) that holds the text itself."""

    ids: list[int]
    start: int
    end: int

    @property
    def read_index(self) -> int:
        """The last content token (what ``last`` pooling reads)."""
        return self.end - 1



@dataclass
class Activations:
    """Pooled activations of unique texts: ``pooled[layer]`` is [n_texts, hidden], fp32, CPU.

    ``sites[name]`` is [n_texts, in_features]: the pooled *input* of each extra module passed to
    :func:`collect` as ``sites``. ``pooling`` says which tokens each row averages.
    """

    texts: list[str]
    layers: list[int]
    pooled: dict[int, torch.Tensor]
    n_tokens: list[int]
    seconds: float = 0.0
    forwards: int = 0
    sites: dict[str, torch.Tensor] = field(default_factory=dict)
    pooling: Pooling = Pooling("last")
    row: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row = {t: i for i, t in enumerate(self.texts)}

    def rows(self, texts: Sequence[str]) -> list[int]:
        return [self.row[t] for t in texts]


class _StopForward(Exception):
    """Raised by the deepest hook: the rest of the model is not needed."""


def encode(tokenizer, text: str, chat_template: bool = False, max_length: int | None = None) -> Encoded:
    """Tokenize ``text`` (optionally as the assistant turn of a chat) and find its token span."""
    if not text.strip():
        raise AmygdalaError("cannot encode an empty text")
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise AmygdalaError(
                f"--chat-template: {type(tokenizer).__name__} has no chat template; drop the flag"
            )
        messages = [{"role": "user", "content": CHAT_PROMPT}, {"role": "assistant", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        char_start = rendered.rfind(text)
        if char_start < 0:
            raise AmygdalaError("chat template altered the text; cannot locate it to read its last token")
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    else:
        char_start = 0
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    char_end = char_start + len(text)
    ids = list(enc["input_ids"])
    content = [
        i for i, (s, e) in enumerate(enc["offset_mapping"])
        if e > s and e > char_start and s < char_end
    ]
    if not content:
        raise AmygdalaError(f"text produced no content tokens: {text[:40]!r}")
    start, end = content[0], content[-1] + 1
    if max_length is not None and end > max_length:
        # Keep the end of the text (every pooling reads it), drop from the front of the content.
        cut = end - max_length
        if cut > start:
            ids = ids[:start] + ids[cut:end]
            end = start + (end - cut)
        else:
            ids, start, end = ids[cut:end], start - cut, end - cut
    return Encoded(ids, start, end)


def distinct(texts: Sequence[str]) -> list[str]:
    """Each text once, in first-seen order: the rows of :func:`collect`'s result. Texts are
    de-duplicated here and nowhere else, so every caller agrees on the row of a text."""
    return list(dict.fromkeys(texts))


class _Capture:
    """The hooks of one :func:`collect` call and what they fill, batch by batch."""

    def __init__(self, encoded: list[Encoded], layers: list[int], hidden: int, pooling: Pooling,
                 on_tokens: TokenCallback | None):
        self.encoded, self.layers, self.pooling, self.on_tokens = encoded, layers, pooling, on_tokens
        self.pooled = {l: torch.empty(len(encoded), hidden, dtype=torch.float32) for l in layers}
        self.sites: dict[str, torch.Tensor] = {}
        self.batch: list[int] = []
        self.offsets: list[int] = []
        self.weights: torch.Tensor | None = None  # [batch, width]: each text's pooling weights

    def start_batch(self, batch: list[int], offsets: list[int], width: int) -> None:
        self.batch, self.offsets = batch, offsets
        w = torch.zeros(len(batch), width)
        for j, i in enumerate(batch):
            a, b = self.pooling.span(self.encoded[i].start, self.encoded[i].end)
            w[j, offsets[j] + a : offsets[j] + b] = 1.0 / (b - a)
        self.weights = w

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """[batch, positions, width] -> [batch, width], fp32, CPU: each text's pooled row."""
        return torch.einsum("bp,bpw->bw", self.weights.to(h.device), h.float()).cpu()

    def site_hook(self, name: str):
        def hook(_module, inputs):
            x = self.pool(inputs[0])
            if name not in self.sites:
                self.sites[name] = torch.empty(len(self.encoded), x.shape[-1], dtype=torch.float32)
            self.sites[name][self.batch] = x
        return hook

    def block_hook(self, layer: int):
        def hook(_module, _inputs, output):
            h = block_output(output)
            self.pooled[layer][self.batch] = self.pool(h)
            if self.on_tokens is not None:
                for j, i in enumerate(self.batch):
                    e = self.encoded[i]
                    self.on_tokens(i, layer, h[j, self.offsets[j] + e.start : self.offsets[j] + e.end], e.start)
            if layer == self.layers[-1]:
                raise _StopForward
        return hook


def _padded(encoded: list[Encoded], batch: list[int], pad_id: int, padding_side: str):
    """(input ids, attention mask, position ids, offsets) of one batch."""
    width = max(len(encoded[i].ids) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    offsets = []
    for j, i in enumerate(batch):
        n = len(encoded[i].ids)
        off = width - n if padding_side == "left" else 0
        ids[j, off : off + n] = torch.tensor(encoded[i].ids)
        mask[j, off : off + n] = 1
        offsets.append(off)
    # Position ids from the mask, so left and right padding give the activations of no padding.
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), offsets


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def collect(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    chat_template: bool = False,
    padding_side: str = "right",
    max_length: int | None = 1024,
    pooling: str | Pooling = DEFAULT_POOLING,
    on_tokens: TokenCallback | None = None,
    progress: bool = True,
    sites: Mapping[str, nn.Module] | None = None,
) -> Activations:
    """Pooled block-output activations of each distinct text at ``layers``: a text given twice
    runs once (this is the one place texts are de-duplicated), rows in first-seen order.

    ``on_tokens(row, layer, matrix, start)`` receives each text's per-token activations (content
    tokens only) as they are computed, so per-token methods and statistics can accumulate in the
    same forward without every matrix staying in memory.

    ``sites`` names extra modules whose *input* is pooled the same way in the same forward
    (an attention output projection's input holds the heads side by side, an MLP down
    projection's input the neurons), so diagnostics need no second pass. They must run before
    the deepest hooked block returns, e.g. sit inside a hooked block.
    """
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    pooling = Pooling.parse(pooling)
    blocks = find_layers(model)
    layers = sorted(set(layers))
    for l in layers:
        if not 0 <= l < len(blocks):
            raise AmygdalaError(f"layer {l} out of range; this model has layers 0-{len(blocks) - 1}")
    given = len(texts)
    texts = distinct(texts)
    if len(texts) < given:
        log.info("%d texts, %d unique: %d duplicate forwards skipped", given, len(texts), given - len(texts))
    encoded = [encode(tokenizer, t, chat_template, max_length) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i].ids))  # similar lengths share a batch
    device = next(model.parameters()).device
    capture = _Capture(encoded, layers, model.config.get_text_config().hidden_size, pooling, on_tokens)
    handles = [blocks[l].register_forward_hook(capture.block_hook(l)) for l in layers]
    handles += [m.register_forward_pre_hook(capture.site_hook(n)) for n, m in (sites or {}).items()]
    bar = tqdm(total=sum(len(e.ids) for e in encoded), unit="tok", desc="forward", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    forwards = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                ids, mask, position_ids, offsets = _padded(encoded, batch, _pad_id(tokenizer), padding_side)
                capture.start_batch(batch, offsets, ids.shape[1])
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                forwards += 1
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    missing = sorted(set(sites or {}) - set(capture.sites))
    if missing and texts:
        raise ValueError(f"sites {', '.join(missing)} never ran before the forward stopped after layer {layers[-1]}")
    return Activations(
        texts=texts,
        layers=list(layers),
        pooled=capture.pooled,
        n_tokens=[e.end - e.start for e in encoded],
        seconds=time.perf_counter() - t0,
        forwards=forwards,
        sites=capture.sites,
        pooling=pooling,
    )
