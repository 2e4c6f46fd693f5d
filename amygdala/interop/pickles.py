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
import pickle
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


def _numpy_names() -> dict[str, object]:
    """numpy's own pickling names for a plain array, as numpy 1.x (``numpy.core``) and 2.x
    (``numpy._core``) write them."""
    core = getattr(np, "_core", None) or np.core
    names: dict[str, object] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[f"{module}._reconstruct"] = core.multiarray._reconstruct
    for dt in ("Float16DType", "Float32DType", "Float64DType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, dt):
            names[f"numpy.dtypes.{dt}"] = getattr(np.dtypes, dt)
    return names


def _allowed() -> dict[str, object]:
    return {**{cls.target: cls for cls in STAND_INS}, **_numpy_names()}


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


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the stand-ins and numpy's array reconstruction; anything else is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _allowed()[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a steering vector") from None


def load(path: Path):
    """The object pickled in ``path`` (a ``torch.save`` zip or a plain pickle), stand-ins for
    foreign classes. Raises ``pickle.UnpicklingError`` (or torch's error) on anything else."""
    if zipfile.is_zipfile(path):
        with torch.serialization.safe_globals([(obj, name) for name, obj in _allowed().items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    return _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
