"""llama.cpp's view of a control-vector GGUF, two ways, for tests/test_interop.py.

- :func:`parse_gguf` and :func:`llama_cpp_added`: the GGUF bytes parsed here independently and
  put through llama.cpp's loader rules (common.cpp) and its adapter's slot rules
  (llama-adapter.cpp), so the layer numbering is checked without llama.cpp installed;
- :func:`llama_cpp_control_vector`: the file read by llama.cpp's own gguf parser (libggml-base,
  through ctypes) when llama-cpp-python is installed.

Why a helper module: these are readers, not tests, and the interop tests are long enough.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest


GGUF_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def parse_gguf(data: bytes) -> dict:
    """The GGUF v3 container as its spec lays it out, with no gguf-package code: header, typed
    key-value pairs, tensor infos, and each tensor's bytes at the aligned data offset."""
    pos = 0

    def take(fmt):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode()

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            sub, n = take("<I"), take("<Q")
            return [value(sub) for _ in range(n)]
        return take(GGUF_TYPES[vtype])

    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        kv[key] = (vtype, value(vtype))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = kv.get("general.alignment", (4, 32))[1]
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        assert offset % align == 0, f"{name}: offset {offset} not aligned to {align}"
        n = int(np.prod(dims))
        tensors[name] = (dims, ggml_type, np.frombuffer(data, "<f4", n, start + offset))
    return {"version": version, "kv": kv, "tensors": tensors, "order": [i[0] for i in infos]}


def llama_cpp_added(path: Path, n_layer: int, strength: float = 1.0) -> dict[int, np.ndarray]:
    """What llama.cpp adds after each block for ``--control-vector-scaled path strength``, by the
    rules of its source: common_control_vector_load_one (``direction.<n>``, n >= 1, F32, 1-D,
    summed into a flat buffer at ``n_embd * (n - 1)``), then llama_adapter_cvec::apply (block
    ``il``'s tensor is the buffer at ``n_embd * (il - 1)``, for il = 1 .. n_layer - 1), and
    the graph adds block ``il``'s tensor to its output (``build_cvec(cur, il)`` before ``l_out``)."""
    f = parse_gguf(path.read_bytes())
    n_embd, buf = -1, np.zeros(0, np.float32)
    for name in f["order"]:
        dims, ggml_type, values = f["tensors"][name]
        prefix, _, number = name.partition(".")
        assert prefix == "direction" and number.isdigit(), f"llama.cpp rejects the file: tensor {name}"
        layer = int(number)
        assert layer >= 1, "llama.cpp rejects the file: invalid (zero) direction tensor layer index"
        assert ggml_type == 0, "llama.cpp rejects the file: non-F32 direction tensor"
        assert len(dims) == 1, "llama.cpp rejects the file: non-1D direction tensor"
        n_embd = dims[0] if n_embd == -1 else n_embd
        assert dims[0] == n_embd
        if buf.size < n_embd * layer:
            buf = np.concatenate([buf, np.zeros(n_embd * layer - buf.size, np.float32)])
        buf[n_embd * (layer - 1): n_embd * layer] += values * strength
    added = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= buf.size:
            added[il] = buf[off: off + n_embd]
    return added


def llama_cpp_or_skip():
    """The llama_cpp module (llama-cpp-python), or a skip saying how to install it."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama_cpp is not importable: pip install llama-cpp-python (tests extra) to run llama.cpp itself")
    return llama_cpp


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml(llama_cpp) -> ctypes.CDLL:
    """llama.cpp's own GGUF parser and tensor accessors (libggml-base, shipped in llama_cpp/lib)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    sig = {
        "gguf_init_from_file": ([ctypes.c_char_p, _GGUFInitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None), "ggml_free": ([ctypes.c_void_p], None),
        "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_val_str": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_val_i32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int32),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_tensor_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "ggml_get_tensor": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_n_dims": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_nelements": ([ctypes.c_void_p], ctypes.c_int64),
        "ggml_get_data_f32": ([ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)),
    }
    for name, (args, res) in sig.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, res
    return lib


def llama_cpp_control_vector(llama_cpp, path: Path, strength: float = 1.0) -> tuple[int, np.ndarray, dict]:
    """(n_embd, flat buffer, keys) as llama.cpp's common_control_vector_load_one builds them, with
    llama.cpp's own gguf parser doing the reading (gguf_init_from_file allocating the tensors,
    ggml_get_tensor, ggml_n_dims, ggml_nelements, the F32 data): the buffer starts at layer 1."""
    lib = _ggml(llama_cpp)
    ggml_ctx = ctypes.c_void_p()
    gctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ggml_ctx)))
    assert gctx, f"llama.cpp's gguf parser failed on {path}"
    try:
        keys = {}
        for key in ("general.architecture", "controlvector.model_hint", "controlvector.layer_count"):
            i = lib.gguf_find_key(gctx, key.encode())
            assert i >= 0, f"{key} missing"
            vtype = lib.gguf_get_kv_type(gctx, i)
            keys[key] = (vtype, lib.gguf_get_val_str(gctx, i).decode() if vtype == 8 else lib.gguf_get_val_i32(gctx, i))
        n_embd, buf = -1, np.zeros(0, np.float32)
        for i in range(lib.gguf_get_n_tensors(gctx)):
            name = lib.gguf_get_tensor_name(gctx, i).decode()
            prefix, _, number = name.partition(".")
            assert prefix == "direction" and number.isdigit() and int(number) >= 1, f"llama.cpp rejects {name}"
            layer = int(number)
            assert lib.gguf_get_tensor_type(gctx, i) == 0, f"{name}: llama.cpp rejects non-F32"
            tensor = lib.ggml_get_tensor(ggml_ctx, name.encode())
            assert lib.ggml_n_dims(tensor) == 1, f"{name}: llama.cpp rejects non-1D"
            n = lib.ggml_nelements(tensor)
            n_embd = n if n_embd == -1 else n_embd
            assert n == n_embd
            if buf.size < n_embd * layer:
                buf = np.concatenate([buf, np.zeros(n_embd * layer - buf.size, np.float32)])
            data = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), shape=(n,))
            buf[n_embd * (layer - 1): n_embd * layer] += data * strength
        return n_embd, buf, keys
    finally:
        lib.gguf_free(gctx)
        lib.ggml_free(ggml_ctx)
