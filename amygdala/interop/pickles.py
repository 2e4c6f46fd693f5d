"""Writing and reading other libraries' pickled objects without importing those libraries.

steering-vectors has no save/load of its own: its vectors are kept with ``torch.save`` (a zip
holding a pickle that names ``steering_vectors.steering_vector.SteeringVector``). repeng's own
save is a GGUF, but its ``ControlVector`` (a dataclass) can be pickled or ``torch.save``d too. To write
such a file we emit the class reference by name (so loading it gives the library's real object)
and to read one we map the name onto a plain stand-in class. Reading never runs arbitrary
code: ``torch.load(weights_only=True)`` and, for plain pickles, an unpickler that resolves only
the stand-ins and numpy's array reconstruction.
"""

from __future__ import annotations

import io
import math
import pickle
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import torch


class StandIn:
    """Attributes of a foreign object, restored by pickle's BUILD into ``__dict__``."""

    #: ``module.qualname`` of the class this stands in for.
    target = ""


class SteeringVectorFile(StandIn):
    target = "steering_vectors.steering_vector.SteeringVector"


class RepengControlVector(StandIn):
    target = "repeng.extract.ControlVector"


STAND_INS = (SteeringVectorFile, RepengControlVector)


class PickleRefused(pickle.UnpicklingError):
    """A pickle that tries something a steering vector never needs (a class, a BUILD, fake data)."""


_limit = threading.local()  # bytes of array data the file being loaded may still yield (its size)
_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_MAX_DIMS = 32


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: only a marker :func:`_reconstruct` expects.

    Why not the class itself: REDUCE would call it, and ``ndarray((2**26,), 'f4')`` allocates an
    array of uninitialised memory from a 128-byte file."""


class _DType:
    """A plain numeric dtype named by a pickle (never numpy's cached one: BUILD sets its byte order)."""

    def __init__(self, name=None, align=False, copy=True):
        if not isinstance(name, str) or name not in _DTYPES:
            raise PickleRefused(f"refusing dtype {name!r}: a steering vector holds plain numbers")
        self.name, self.order = name, "="

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise PickleRefused("refusing a dtype state other than a byte order")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.name).newbyteorder(self.order if self.order != "|" else "=")


class _Array:
    """An array being unpickled: empty until BUILD hands it its bytes, which must all be there."""

    value = None

    def __setstate__(self, state):
        if self.value is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise PickleRefused("refusing an array state that is not numpy's (version, shape, dtype, order, data)")
        shape, dtype, fortran, data = state[-4:]
        self.value = _array(data, dtype, shape, "F" if fortran is True else "C")


def _array(data, dtype, shape, order: str) -> np.ndarray:
    """An array from its real bytes only; all arrays of one file together at most the file's size."""
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise PickleRefused("refusing an array without its own bytes and a plain dtype")
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise PickleRefused(f"refusing array shape {str(shape)[:60]}")
    dt = dtype.numpy()
    if math.prod(shape) * dt.itemsize != len(data):
        raise PickleRefused(f"array of shape {shape} and dtype {dtype.name}: {len(data)} bytes of data do not fit it")
    left = getattr(_limit, "left", 0)
    if len(data) > left:
        raise PickleRefused("the arrays hold more bytes than the file")
    _limit.left = left - len(data)
    return np.frombuffer(bytes(data), dtype=dt).reshape(shape, order=order).copy()


def _reconstruct(cls=None, shape=None, typecode=None):
    if cls is not _NdarrayName or shape != (0,) or typecode != b"b":
        raise PickleRefused("refusing numpy _reconstruct other than of an empty array (the data comes by BUILD)")
    return _Array()


def _frombuffer(buf=None, dtype=None, shape=None, order="C"):  # protocol 5's form of an array
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf.raw())
    return _array(buf, dtype, shape, "F" if order == "F" else "C")


def _latin1(text=None, encoding=None):  # protocol 2 keeps bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PickleRefused("refusing _codecs.encode other than of a str to latin1 bytes")
    return text.encode("latin1")


def _numpy_names() -> dict[str, object]:
    """numpy's own pickling names for a plain array, as numpy 1.x (``numpy.core``) and 2.x
    (``numpy._core``) write them, each mapped to a checked stand-in (never numpy's own callables)."""
    names: dict[str, object] = {"numpy.ndarray": _NdarrayName, "numpy.dtype": _DType, "_codecs.encode": _latin1}
    for core in ("numpy.core", "numpy._core"):
        names[f"{core}.multiarray._reconstruct"] = _reconstruct
        names[f"{core}.numeric._frombuffer"] = _frombuffer
    return names


def _allowed() -> dict[str, object]:
    return {**{cls.target: cls for cls in STAND_INS}, **_numpy_names()}


def _resolve(obj, seen: dict, depth: int = 0):
    """The loaded object with every placeholder replaced by its numpy value."""
    if depth > 100:
        raise PickleRefused("refusing objects nested more than 100 deep")
    if isinstance(obj, _Array):
        if obj.value is None:
            raise PickleRefused("an array without data")
        return obj.value
    if isinstance(obj, _DType):
        return obj.numpy()
    if isinstance(obj, (dict, list, tuple, StandIn)) and id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], seen, depth + 1)
    elif isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_resolve(v, seen, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        seen[id(obj)] = obj
        obj = seen[id(obj)] = tuple(_resolve(v, seen, depth + 1) for v in obj)
    elif isinstance(obj, StandIn):
        seen[id(obj)] = obj
        _resolve(obj.__dict__, seen, depth + 1)
    return obj


class _NamedPickler(pickle._Pickler):
    """Pure-Python pickler that writes a stand-in class as a reference to its target by name."""

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, StandIn) and obj.target:
            module, _, qualname = obj.target.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def torch_save(stand_in: type, state: dict, path: Path) -> None:
    """``torch.save`` of an object of the stand-in's target class with ``state`` as its ``__dict__``."""
    obj = stand_in.__new__(stand_in)
    obj.__dict__.update(state)
    module = types.ModuleType("amygdala_named_pickle")  # torch.save's pickle_module: only Pickler is used
    module.Pickler, module.Unpickler, module.load, module.dump = _NamedPickler, pickle.Unpickler, pickle.load, pickle.dump
    torch.save(obj, path, pickle_module=module, pickle_protocol=2)


class _SafeUnpickler(pickle._Unpickler):
    """Resolves only the stand-ins and the checked numpy names; BUILD only on their instances.

    The pure-Python unpickler, so BUILD can be checked: on a class it would set class attributes
    for the rest of the process (``SteeringVectorFile.target = "builtins.eval"``)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        try:
            return _allowed()[f"{module}.{name}"]
        except KeyError:
            raise PickleRefused(f"refusing to load {module}.{name}: not part of a steering vector") from None

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) in (_Array, _DType):
            return super().load_build()
        if type(inst) not in STAND_INS or not isinstance(state, dict):
            raise PickleRefused(f"refusing to set state on a {type(inst).__name__}: only a steering vector object's dict")
        self.stack.pop()
        inst.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})

    dispatch[pickle.BUILD[0]] = load_build


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # is_zipfile lets this through for some damaged end records
        return True


def load(path: Path):
    """The object pickled in ``path`` (a ``torch.save`` zip or a plain pickle), stand-ins for
    foreign classes. Raises ``pickle.UnpicklingError`` (or torch's error) on anything else.

    Arrays come only from bytes the file holds, all together at most the file's size; a zip's
    members must be stored (uncompressed, as ``torch.save`` writes them) so they are no larger."""
    size = path.stat().st_size
    _limit.left = size
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as z:
                if sum(i.file_size for i in z.infolist()) > size:
                    raise PickleRefused("a zip whose members are larger than the file (compressed); torch.save "
                                        "stores them")
                for info in z.infolist():  # every member read and CRC-checked here first: torch's zip
                    z.read(info)           # reader took 1.5 GB on a 1.4 KB zip with a damaged local header
            with torch.serialization.safe_globals([(obj, name) for name, obj in _allowed().items()]
                                                  + [_Array, _DType]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
        return _resolve(obj, {})
    finally:
        _limit.left = 0
