"""Which tokens of a text make its one pooled row.

Why it matters: a concept vector is a difference of pooled rows, so pooling decides what the
vector can see. Reading only the last token of a story sees whatever the story ends on; the
mean over its content tokens sees the feeling it carries throughout. On the default model the
mean gave concept vectors a valence axis that the last token did not (docs/validity.md).

- ``last``: the last content token.
- ``mean``: every content token (the default).
- ``mean_from=K``: content tokens from the K-th on, skipping the text's opening, where the
  feeling has not yet been shown (the emotion study this follows used K = 50); a text shorter
  than K+1 tokens falls back to its last half.

Content tokens exclude special tokens and chat-template scaffolding (found by character
offsets), and position 0 of the sequence, whose residual norm is an outlier at every layer
(the attention sink) whatever token stands there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amygdala import AmygdalaError

POOLINGS = ("last", "mean", "mean_from=K")
DEFAULT_POOLING = "mean"


@dataclass(frozen=True)
class Pooling:
    kind: str  # "last" | "mean" | "mean_from"
    skip: int = 0  # mean_from: content tokens skipped at the start

    @classmethod
    def parse(cls, spec: str | Pooling) -> Pooling:
        """``last`` | ``mean`` | ``mean_from=K``; AmygdalaError naming ``pooling`` otherwise."""
        if isinstance(spec, Pooling):
            return spec
        text = str(spec).strip()
        if text in ("last", "last_content_token"):  # the second is what format-1 files recorded
            return cls("last")
        if text == "mean":
            return cls("mean")
        m = re.fullmatch(r"mean_from\s*=\s*(\d+)", text)
        if m:
            return cls("mean_from", int(m.group(1)))
        raise AmygdalaError(f"pooling {text!r}: use one of {', '.join(POOLINGS)} (K a whole number, e.g. mean_from=50)",
                            param="pooling")

    def __str__(self) -> str:
        return f"mean_from={self.skip}" if self.kind == "mean_from" else self.kind

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The sequence positions [a, b) pooled for a text whose content tokens are [start, end)."""
        if self.kind == "last":
            return end - 1, end
        first = max(start, 1) if end - max(start, 1) >= 1 else start  # never the sink, unless it is all there is
        if self.kind == "mean_from":
            if end - (first + self.skip) >= 1:
                first += self.skip
            else:
                first = max(first, end - max(1, (end - start) // 2))
        return first, end
