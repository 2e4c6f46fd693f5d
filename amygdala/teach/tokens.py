"""Text samples -> the token IDs ``/train`` takes, with the served model's own tokenizer.

Why here (the client): the training API takes token IDs so the server never guesses a
template; the client must then tokenize exactly as the model is prompted. Messages go through
the tokenizer's chat template with the generation prompt, and the continuation is the
assistant's text followed by the template's end-of-turn token (the model learns to stop). A
text context is wrapped as a user turn when the tokenizer has a chat template (``raw=False``),
else it is tokenized as is and the continuation follows it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amygdala.teach.samples import Context, SampleError, TeachSample


@dataclass
class Encoder:
    tokenizer: object
    max_length: int | None = None  # the model's max_position_embeddings, when its config is at hand
    raw: bool = False

    @classmethod
    def load(cls, path: str | Path, raw: bool = False) -> Encoder:
        from transformers import AutoConfig, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise SampleError(f"tokenizer {path}: cannot load a tokenizer there ({e}); give the served model's "
                              "folder", param="tokenizer") from None
        try:
            length = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", None)
        except (OSError, ValueError):
            length = None
        return cls(tok, length, raw)

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None)) and not self.raw

    def context_ids(self, context: Context, where: str = "context") -> list[int]:
        if isinstance(context, str) and not self.chat:
            return list(self.tokenizer(context)["input_ids"])
        if isinstance(context, str):
            context = (("user", context),)
        if not self.chat:
            raise SampleError(f"{where}: chat messages, but the tokenizer has no chat template (or --raw); "
                              "give the context as text")
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in context],
                                                 add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def continuation_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.chat and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)  # the template's end of turn: the model learns to stop
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def sample(self, s: TeachSample, objective: str, where: str) -> dict:
        """A ``/train`` sample; SampleError naming ``where`` when it cannot be one."""
        out = {"context_ids": self.context_ids(s.context, where), "continuation_ids": self.continuation_ids(s.chosen)}
        if objective in ("orpo", "dpo", "dpop"):
            if s.rejected is None:
                raise SampleError(f"{where}: field 'rejected': missing; objective {objective} needs a rejected "
                                  "continuation (use --objective sft, or pairs with rejected)")
            out["rejected_ids"] = self.continuation_ids(s.rejected)
        for key in ("continuation_ids", "rejected_ids"):
            if key not in out:
                continue
            if not out[key]:
                raise SampleError(f"{where}: field {key.removesuffix('_ids').replace('continuation', 'chosen')!r}: "
                                  "no tokens after tokenizing")
            n = len(out["context_ids"]) + len(out[key])
            if self.max_length is not None and n > self.max_length:
                raise SampleError(f"{where}: field 'context': {n} tokens with the "
                                  f"{key.removesuffix('_ids').replace('continuation', 'chosen')}, over the model's "
                                  f"{self.max_length}; shorten it")
        return out
