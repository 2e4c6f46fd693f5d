"""Forward passes with hooks: one per unique text, pooled or per-token, stopped early."""

from amygdala.activations.collect import CHAT_PROMPT, Activations, Encoded, collect, distinct, encode
from amygdala.activations.pooling import DEFAULT_POOLING, POOLINGS, Pooling

__all__ = ["CHAT_PROMPT", "DEFAULT_POOLING", "POOLINGS", "Activations", "Encoded", "distinct", "Pooling", "collect", "encode"]
