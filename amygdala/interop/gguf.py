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
import math
import os
import struct
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


#: Caps of the bounded header parse: a control vector has a handful of keys and one tensor per layer.
MAX_KV = 1024
MAX_TENSORS = 4096
MAX_STRING = 1 << 20
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY, _F32 = 8, 9, 0


class _Header:
    """GGUF's header read field by field, every count and length checked against the bytes left.

    Why: ``gguf.GGUFReader`` loops once per declared array element, past the end of the file, so a
    166-byte file declaring 2^40 elements ran for minutes and ran out of memory. Here a count can
    never be larger than the bytes that could hold it, so the parse is linear in the file's size."""

    def __init__(self, path: Path):
        self.path, self.f = path, open(path, "rb")
        self.size = os.fstat(self.f.fileno()).st_size

    def fail(self, what: str):
        raise InteropError(f"{self.path}: not a readable GGUF file ({what} at byte {self.f.tell()})")

    def _room(self, n: int) -> None:
        if n > self.size - self.f.tell():
            self.fail(f"{n} bytes declared, {self.size - self.f.tell()} left")

    def take(self, n: int) -> bytes:
        self._room(n)
        return self.f.read(n)

    def skip(self, n: int) -> None:
        self._room(n)
        self.f.seek(n, os.SEEK_CUR)

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        if n > MAX_STRING:
            self.fail(f"a string of {n} bytes")
        return self.take(n)

    def value(self, kind: int, depth: int = 0) -> bytes | None:
        """Skip one value (a string's bytes are returned: the architecture is one)."""
        if kind in _SCALAR:
            self.skip(_SCALAR[kind])
        elif kind == _STRING:
            return self.string()
        elif kind == _ARRAY and depth == 0:
            item, count = self.u32(), self.u64()
            if item in _SCALAR:
                self.skip(count * _SCALAR[item])
            elif item in (_STRING, _ARRAY) and count <= (self.size - self.f.tell()) // 8:
                for _ in range(count):
                    self.value(item, depth + 1)
            else:
                self.fail(f"an array of {count} items of type {item}")
        else:
            self.fail(f"value type {kind}")
        return None


def check_header(path: Path) -> None:
    """Refuse a GGUF that is not a well-formed control vector before any ``gguf`` reader sees it:
    version 2 or 3, at most :data:`MAX_KV` keys and :data:`MAX_TENSORS` tensors, every length
    inside the file, architecture ``controlvector``, F32 tensors of at most 4 dimensions whose data
    lies inside the file."""
    h = _Header(path)
    with h.f:
        if h.take(4) != MAGIC:
            h.fail("no GGUF magic")
        if (version := h.u32()) not in (2, 3):
            h.fail(f"version {version}")
        tensors, kvs = h.u64(), h.u64()
        if tensors > MAX_TENSORS or kvs > MAX_KV:
            h.fail(f"{tensors} tensors and {kvs} keys declared (a control vector has at most {MAX_TENSORS} and {MAX_KV})")
        arch, alignment = None, 32
        for _ in range(kvs):
            key, kind = h.string(), h.u32()
            if key == b"general.alignment" and kind == 4:
                alignment = h.u32()
                continue
            text = h.value(kind)
            if key == b"general.architecture":
                arch = text.decode("utf-8", errors="replace") if text is not None else None
        if arch != ARCH:
            raise InteropError(
                f"{path}: general.architecture is {arch!r}, not {ARCH!r}: this GGUF is not a control vector "
                "(a model file?); pass a file written by amygdala export, repeng or llama-cvector-generator")
        if not alignment or alignment & (alignment - 1):
            h.fail(f"alignment {alignment}")
        spans = []
        for _ in range(tensors):
            name, dims = h.string(), h.u32()
            if dims > 4:
                h.fail(f"tensor {name[:60]!r} with {dims} dimensions")
            shape = [h.u64() for _ in range(dims)]
            kind, offset = h.u32(), h.u64()
            if kind != _F32:
                raise InteropError(f"{path}: tensor {name.decode(errors='replace')} is of GGML type {kind}; llama.cpp "
                                   "reads F32 control vectors only")
            spans.append((name, offset, 4 * math.prod(shape)))
        start = -(-h.f.tell() // alignment) * alignment
        for name, offset, nbytes in spans:
            if start + offset + nbytes > h.size:
                h.fail(f"tensor {name[:60]!r}'s {nbytes} bytes at offset {offset} past the file's end")


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
        check_header(path)
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
        if prefix != "direction" or not dot or not (number.isascii() and number.isdigit()):  # "²".isdigit() too
            raise InteropError(f"{path}: tensor {t.name!r} is not direction.<layer>; llama.cpp would reject this file")
        layer = int(number)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InteropError(f"{path}: tensor {t.name} is {t.tensor_type.name}; llama.cpp reads F32 control vectors only")
        dims = [int(d) for d in t.shape]  # ggml order; like ggml_n_dims, trailing 1s do not count
        if max((i + 1 for i, d in enumerate(dims) if d > 1), default=1) != 1:
            raise InteropError(f"{path}: tensor {t.name} has shape {dims}; control vectors are 1-D")
        v = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        if layer in directions and directions[layer].shape != v.shape:  # direction.1 beside direction.01
            raise InteropError(f"{path}: two tensors for layer {layer} of sizes {directions[layer].numel()} and "
                               f"{v.numel()}; control vectors are of one size")
        directions[layer] = directions[layer] + v if layer in directions else v
    origin = {}
    if (text := _string(reader, ORIGIN_KEY)) is not None:
        try:
            origin = json.loads(text)
            origin = origin if isinstance(origin, dict) else {"unparsed": text[:1000]}
        except (ValueError, RecursionError):  # deep nesting raises RecursionError, not a decode error
            origin = {"unparsed": text[:1000]}
    vectors = LayerVectors(directions, _string(reader, f"{ARCH}.model_hint"), origin)
    return vectors.check(str(path))
