"""Resolving, loading and navigating models: the default model, decoder layers, projections."""

from amygdala.models.resolve import DEFAULT_MODEL_NAME, ModelInfo, load_model, model_info, resolve_model
from amygdala.models.layers import find_layers, parse_layers, relative_depth

__all__ = [
    "DEFAULT_MODEL_NAME", "ModelInfo", "load_model", "model_info", "resolve_model",
    "find_layers", "parse_layers", "relative_depth",
]
