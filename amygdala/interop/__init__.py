"""Concept vectors in and out of other steering tools: llama.cpp / Ollama control-vector GGUFs,
repeng's ``ControlVector`` and steering-vectors' ``SteeringVector`` (docs/interop.md).

Every format is a vector per decoder block added to that block's output, numbered as amygdala
numbers layers (``site: block_output``), so conversion is a change of container only.

>>> vectors = from_readout(Readout.load("out/r"), {"calm": 1, "anxious": -0.5}, strength=4)
>>> write_vectors(vectors, "calm.gguf", "gguf")        # llama.cpp --control-vector calm.gguf
>>> vectors, fmt = read_vectors("calm.gguf")
>>> r = add_concept(Readout.load("out/r"), vectors, "calm_mix", {"from": "calm.gguf", "format": fmt})
>>> # a readout with statistics: measure the new row's (pipeline.concept_statistics), then
>>> fill_statistics(r, "calm_mix", mean, std).save("out/r")
"""

from amygdala.interop.files import read_vectors, sha256, write_vectors
from amygdala.interop.vectors import (
    FORMATS, InteropError, LayerVectors, add_concept, check_fits, check_format, fill_statistics, from_readout,
    new_readout,
)

__all__ = [
    "FORMATS", "InteropError", "LayerVectors", "add_concept", "check_fits", "check_format", "fill_statistics",
    "from_readout", "new_readout", "read_vectors", "sha256", "write_vectors",
]
