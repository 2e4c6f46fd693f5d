"""Forward passes with hooks: one per unique text, pooled or per-token, stopped early."""

from amygdala.activations.collect import CHAT_PROMPT, Activations, Encoded, collect, encode

__all__ = ["CHAT_PROMPT", "Activations", "Encoded", "collect", "encode"]
