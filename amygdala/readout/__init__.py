"""The readout file format and readout / steering on transformers models."""

from amygdala.readout.format import FORMAT_VERSION, Readout, ReadoutError
from amygdala.readout.runtime import ReadoutSession, Steering, attach
from amygdala.readout.text import DEFAULT_SMOOTH, TextScores, read_text, score_text, smooth_causal, token_rows, top_concepts

__all__ = ["DEFAULT_SMOOTH", "smooth_causal", "FORMAT_VERSION", "Readout", "ReadoutError", "ReadoutSession", "Steering", "TextScores", "attach", "read_text", "score_text", "token_rows", "top_concepts"]
