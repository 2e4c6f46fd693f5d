"""The readout file format and readout / steering on transformers models."""

from amygdala.readout.format import FORMAT_VERSION, Readout, ReadoutError
from amygdala.readout.runtime import ReadoutSession, Steering, attach

__all__ = ["FORMAT_VERSION", "Readout", "ReadoutError", "ReadoutSession", "Steering", "attach"]
