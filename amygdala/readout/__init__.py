"""The readout file format and readout / steering on transformers models."""

from amygdala.readout.format import FORMAT_VERSION, Readout, ReadoutError
from amygdala.readout.runtime import ReadoutSession, Steering, attach
from amygdala.readout.text import read_text, top_concepts

__all__ = ["FORMAT_VERSION", "Readout", "ReadoutError", "ReadoutSession", "Steering", "attach", "read_text", "top_concepts"]
