"""Run a model over texts once each and capture the residual stream at chosen decoder layers.

Why it is built this way:
- One forward per *unique* text: a concept's positive is every other concept's negative, so a
  naive loop would run each text once per concept.
- The forward stops right after the deepest hooked layer (an exception from its hook), so no
  later layers and no lm_head run.
- Pooling reads the last *content* token, located by character offsets, never a special token:
  with a chat template the end-of-turn marker looks the same for every text (the original
  system's failure), and ``--chat-template`` must not read there.
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
        """The last content token: where a pooled activation is read."""
        return self.end - 1


@dataclass
class Activations:
    """Pooled activations of unique texts: ``pooled[layer]`` is [n_texts, hidden], fp32, CPU.

    ``sites[name]`` is [n_texts, in_features]: the pooled *input* of each extra module passed to
    :func:`collect` as ``sites``.
    """

    texts: list[str]
    layers: list[int]
    pooled: dict[int, torch.Tensor]
    n_tokens: list[int]
    seconds: float = 0.0
    forwards: int = 0
    sites: dict[str, torch.Tensor] = field(default_factory=dict)
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
        # Keep the end of the text (where pooling reads), drop from the front of the content.
        cut = end - max_length
        if cut > start:
            ids = ids[:start] + ids[cut:end]
            end = start + (end - cut)
        else:
            ids, start, end = ids[cut:end], start - cut, end - cut
    return Encoded(ids, start, end)


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
    on_tokens: TokenCallback | None = None,
    progress: bool = True,
    sites: Mapping[str, nn.Module] | None = None,
) -> Activations:
    """Pooled (last content token) block-output activations of each unique text at ``layers``.

    ``on_tokens(row, layer, matrix, start)`` receives each text's per-token activations (content
    tokens only) as they are computed, so per-token methods can accumulate without every
    matrix staying in memory.

    ``sites`` names extra modules whose *input* is pooled at the same token in the same forward
    (an attention output projection's input holds the heads side by side, an MLP down
    projection's input the neurons), so diagnostics need no second pass. They must run before
    the deepest hooked block returns, e.g. sit inside a hooked block.
    """
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    blocks = find_layers(model)
    layers = sorted(set(layers))
    for l in layers:
        if not 0 <= l < len(blocks):
            raise AmygdalaError(f"layer {l} out of range; this model has layers 0-{len(blocks) - 1}")
    unique = list(dict.fromkeys(texts))
    if len(unique) < len(texts):
        log.info("%d texts, %d unique: %d duplicate forwards skipped", len(texts), len(unique), len(texts) - len(unique))
    encoded = [encode(tokenizer, t, chat_template, max_length) for t in unique]
    order = sorted(range(len(unique)), key=lambda i: -len(encoded[i].ids))
    device = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size
    pooled = {l: torch.empty(len(unique), hidden, dtype=torch.float32) for l in layers}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    current: dict[str, object] = {}
    site_pooled: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> torch.Tensor:
        """[batch, positions, width] at each text's read position: [batch, width], fp32, CPU."""
        batch, offsets = current["batch"], current["offsets"]
        rows = torch.tensor([offsets[j] + encoded[i].read_index for j, i in enumerate(batch)], device=h.device)
        return h[torch.arange(len(batch), device=h.device), rows].float().cpu()

    def make_site_hook(name: str):
        def hook(_module, inputs):
            x = read(inputs[0])
            if name not in site_pooled:
                site_pooled[name] = torch.empty(len(unique), x.shape[-1], dtype=torch.float32)
            site_pooled[name][current["batch"]] = x
        return hook

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            h = block_output(output)
            batch = current["batch"]
            offsets = current["offsets"]
            pooled[layer][batch] = read(h)
            if on_tokens is not None:
                for j, i in enumerate(batch):
                    e = encoded[i]
                    on_tokens(i, layer, h[j, offsets[j] + e.start : offsets[j] + e.end], e.start)
            if layer == layers[-1]:
                raise _StopForward
        return hook

    handles = [blocks[l].register_forward_hook(make_hook(l)) for l in layers]
    handles += [m.register_forward_pre_hook(make_site_hook(n)) for n, m in (sites or {}).items()]
    total_tokens = sum(len(e.ids) for e in encoded)
    bar = tqdm(total=total_tokens, unit="tok", desc="forward", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    forwards = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
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
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                current.update(batch=batch, offsets=offsets)
                try:
                    model(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        position_ids=position_ids.to(device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                forwards += 1
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    missing = sorted(set(sites or {}) - set(site_pooled))
    if missing and unique:
        raise ValueError(f"sites {', '.join(missing)} never ran before the forward stopped after layer {layers[-1]}")
    return Activations(
        texts=unique,
        layers=list(layers),
        pooled=pooled,
        n_tokens=[e.end - e.start for e in encoded],
        seconds=time.perf_counter() - t0,
        forwards=forwards,
        sites=site_pooled,
    )
