"""llama.cpp's control-vector GGUF, written and read with the ``gguf`` package.

What llama.cpp's loader (``common_control_vector_load_one`` in ``common/common.cpp``) accepts:
every tensor is named ``direction.<n>`` with ``n >= 1`` (``direction.0`` and any other name make
it drop the whole file), is F32, 1-D and of one size. It reads no key-value pair; the keys
``general.architecture = controlvector``, ``controlvector.model_hint`` and
``controlvector.layer_count`` are the convention its own ``cvector-generator`` writes (and
repeng's ``export_gguf``), kept so other tools recognise the file.

The numbering: the loader puts ``direction.<n>`` at ``n_embd * (n - 1)`` of a flat buffer that
starts at layer 1; ``llama_adapter_cvec::apply`` copies offset ``n_embd * (il - 1)`` into the
tensor of layer ``il``; the model graph adds that tensor to ``l_out`` of layer ``il``, the
residual stream after block ``il``. So ``direction.<n>`` is added after block ``n``: amygdala's
layer ``n`` (``site: block_output``), with no offset. Layer 0 cannot be written: llama.cpp has
no slot for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from amygdala.interop.vectors import InteropError, LayerVectors

ARCH = "controlvector"
MAGIC = b"GGUF"
#: Extra key with amygdala's record of what the vector is (llama.cpp and repeng ignore it).
ORIGIN_KEY = "amygdala.origin"


def write(vectors: LayerVectors, path: str | Path, *, layer_count_signed: bool = True, allow_layer0: bool = False) -> Path:
    """Write ``vectors`` as a control-vector GGUF (F32 ``direction.<layer>`` tensors, layer order).

    ``layer_count_signed``: llama.cpp's cvector-generator stores ``controlvector.layer_count``
    as int32, repeng as uint32; readers take either. ``allow_layer0``: repeng's own loader
    accepts ``direction.0``; llama.cpp refuses the whole file, so the llama.cpp export does not.
    """
    import gguf

    path = Path(path)
    if 0 in vectors.directions and not allow_layer0:
        raise InteropError(
            "layer 0: llama.cpp's control vectors cannot steer after block 0 (its loader rejects direction.0); "
            "export the other layers with --layers"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", vectors.model_hint or "unknown")
        (writer.add_int32 if layer_count_signed else writer.add_uint32)(f"{ARCH}.layer_count", len(vectors.layers))
        if vectors.origin:
            writer.add_string(ORIGIN_KEY, json.dumps(vectors.origin, sort_keys=True))
        for l in vectors.layers:
            writer.add_tensor(f"direction.{l}", vectors.directions[l].float().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read(path: str | Path) -> LayerVectors:
    """A control-vector GGUF as :class:`LayerVectors`, refused where llama.cpp's loader would
    refuse it (except ``direction.0``, which repeng writes and reads). Like llama.cpp, two
    tensors for one layer add up."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise InteropError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _string(reader, "general.architecture")
    if arch != ARCH:
        raise InteropError(
            f"{path}: general.architecture is {arch!r}, not {ARCH!r}: this GGUF is not a control vector "
            "(a model file?); pass a file written by amygdala export, repeng or llama-cvector-generator"
        )
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        prefix, dot, number = t.name.partition(".")
        if prefix != "direction" or not dot or not number.isdigit():
            raise InteropError(f"{path}: tensor {t.name!r} is not direction.<layer>; llama.cpp would reject this file")
        layer = int(number)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InteropError(f"{path}: tensor {t.name} is {t.tensor_type.name}; llama.cpp reads F32 control vectors only")
        dims = [int(d) for d in t.shape]  # ggml order; like ggml_n_dims, trailing 1s do not count
        if max((i + 1 for i, d in enumerate(dims) if d > 1), default=1) != 1:
            raise InteropError(f"{path}: tensor {t.name} has shape {dims}; control vectors are 1-D")
        v = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        directions[layer] = directions[layer] + v if layer in directions else v
    origin = {}
    if (text := _string(reader, ORIGIN_KEY)) is not None:
        try:
            origin = json.loads(text)
        except json.JSONDecodeError:
            origin = {"unparsed": text}
    vectors = LayerVectors(directions, _string(reader, f"{ARCH}.model_hint"), origin)
    return vectors.check(str(path))
