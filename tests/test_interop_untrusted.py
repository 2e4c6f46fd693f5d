"""Vector files from strangers (issue 24): a GGUF, pickle or zip that is not a sound steering vector
is refused in one line, in bounded time and memory, and never changes the process."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amygdala.cli.main import main as cli
from amygdala.interop import pickles, read_vectors
from amygdala.interop.vectors import InteropError

ROOT = Path(__file__).resolve().parents[1]


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _gguf(kvs: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


HUGE_ARRAY = _gguf(_s(b"general.architecture") + struct.pack("<I", 8) + _s(b"controlvector")
                   + _s(b"a") + struct.pack("<IIQ", 9, 0, 1 << 40), 2)


def _in_a_small_process(path: Path) -> subprocess.CompletedProcess:
    """read_vectors(path) in a child with 1 GiB of address space beyond what its imports took, so a
    reader that allocates per declared element fails (MemoryError) instead of eating the machine.
    The cap is set after the imports: torch's own mappings differ by build and machine (a fixed
    1 GiB cap let the import itself fail on a fresh machine)."""
    code = ("import os,resource,sys\n"
            "from amygdala.interop import read_vectors; from amygdala.interop.vectors import InteropError\n"
            "used = int(open('/proc/self/statm').read().split()[0]) * os.sysconf('SC_PAGE_SIZE')\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), used + (1 << 30)))\n"
            "try:\n read_vectors(sys.argv[1])\nexcept InteropError as e:\n print('refused:', e); sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_a_gguf_array_declaring_2_40_elements_is_refused_by_the_header_parse(tmp_path):
    path = tmp_path / "evil.gguf"
    path.write_bytes(HUGE_ARRAY)
    assert len(HUGE_ARRAY) < 200
    done = _in_a_small_process(path)
    assert done.returncode == 3 and "1099511627776 bytes declared" in done.stdout, done.stderr[-500:]


@pytest.mark.parametrize("what,data", [
    ("a 2^60-byte key", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60)),
    ("2^40 keys", b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40)),
    ("2^40 tensors", b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0)),
    ("a string array of 2^50", _gguf(_s(b"k") + struct.pack("<IIQ", 9, 8, 1 << 50), 1)),
    ("nested arrays", _gguf(_s(b"k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1), 1)),
    ("version 99", b"GGUF" + struct.pack("<IQQ", 99, 0, 0)),
    ("a tensor past the end", _gguf(_s(b"general.architecture") + struct.pack("<I", 8) + _s(b"controlvector"), 1,
                                    _s(b"direction.1") + struct.pack("<IQIQ", 1, 1 << 30, 0, 0), 1)),
])
def test_malformed_gguf_headers_are_refused(tmp_path, what, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(InteropError, match="not a readable GGUF file"):
        read_vectors(path)


def _gguf_with(tmp_path, names_and_sizes) -> Path:
    import gguf

    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    for name, size in names_and_sizes:
        w.add_tensor(name, np.ones(size, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_superscript_layer_number_is_refused(tmp_path):
    with pytest.raises(InteropError, match="not direction.<layer>"):
        read_vectors(_gguf_with(tmp_path, [("direction.²", 8)]))


def test_two_tensors_of_one_layer_and_different_sizes_are_refused(tmp_path):
    with pytest.raises(InteropError, match="two tensors for layer 1 of sizes 8 and 4"):
        read_vectors(_gguf_with(tmp_path, [("direction.1", 8), ("direction.01", 4)]))


def test_deep_json_in_the_origin_key_does_not_escape(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "deep.gguf"), "controlvector")
    w.add_string("amygdala.origin", "[" * 100_000 + "]" * 100_000)
    w.add_tensor("direction.1", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got, _ = read_vectors(tmp_path / "deep.gguf")
    assert got.layers == [1] and "unparsed" in got.origin


# --------------------------------------------------------------------------- pickles
def _ndarray_without_data(n: int) -> bytes:
    """REDUCE numpy.ndarray((n,), 'f4'): an array of uninitialised memory, no data in the file."""
    return (b"\x80\x02cnumpy\nndarray\n" + b"(J" + struct.pack("<i", n) + b"\x85U\x02f4tR"
            + b"}(U\nlayer_typeU\rdecoder_blockU\x11layer_activations}K\x01h\x00sub.")


def test_an_array_without_its_data_is_refused(tmp_path):
    path = tmp_path / "v.pkl"
    data = (b"\x80\x02csteering_vectors.steering_vector\nSteeringVector\n)\x81}(X\x11\x00\x00\x00layer_activations}K\x01"
            b"cnumpy\nndarray\n(J" + struct.pack("<i", 1 << 26) + b"\x85X\x02\x00\x00\x00f4tRsX\n\x00\x00\x00layer_type"
            b"X\r\x00\x00\x00decoder_blockub.")
    path.write_bytes(data)
    assert len(data) < 200
    with pytest.raises(InteropError, match="not a steering vector that can be loaded safely"):
        read_vectors(path)


def test_a_build_on_a_class_is_refused_and_changes_nothing(tmp_path):
    path = tmp_path / "v.pkl"
    # GLOBAL SteeringVector (the stand-in class itself), BUILD (None, {"target": "builtins.eval"})
    path.write_bytes(b"\x80\x02csteering_vectors.steering_vector\nSteeringVector\nN}X\x06\x00\x00\x00target"
                     b"X\r\x00\x00\x00builtins.evals\x86b.")
    with pytest.raises(InteropError, match="not a steering vector"):
        read_vectors(path)
    assert pickles.SteeringVectorFile.target == "steering_vectors.steering_vector.SteeringVector"


def test_array_bytes_larger_than_the_shape_or_the_file_are_refused():
    dtype = pickles._DType("f4")
    pickles._limit.left = 8
    with pytest.raises(pickle.UnpicklingError, match="do not fit"):
        pickles._array(b"\x00" * 12, dtype, (2,), "C")
    pickles._limit.left = 4
    with pytest.raises(pickle.UnpicklingError, match="more bytes than the file"):
        pickles._array(b"\x00" * 8, dtype, (2,), "C")
    pickles._limit.left = 0


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_numpy_pickles_still_load(tmp_path, protocol):
    """A repeng-like state with float32 arrays, pickled by numpy itself at each protocol."""
    obj = {"directions": {1: np.arange(4, dtype=np.float32), 2: np.arange(4, dtype=">f4")}}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = pickles.load(path)
    assert np.array_equal(got["directions"][1], obj["directions"][1]) and got["directions"][2].tolist() == [0, 1, 2, 3]


def test_a_steering_vectors_file_with_non_integer_layer_keys_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "v.pt"
    pickles.torch_save(pickles.SteeringVectorFile, {"layer_activations": {"a": torch.ones(4)},
                                                    "layer_type": "decoder_block"}, path)
    assert cli(["import", "--from", str(path), "--name", "x", "--into", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert "layer numbers (integers)" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_compressed_zip_is_refused(tmp_path):
    import zipfile
    path = tmp_path / "v.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x00" * 100_000)
    with pytest.raises(InteropError, match="larger than the file"):
        read_vectors(path)


def test_the_cli_refuses_the_huge_gguf_in_one_line(tmp_path, capsys):
    path = tmp_path / "evil.gguf"
    path.write_bytes(HUGE_ARRAY)
    assert cli(["import", "--from", str(path), "--name", "x", "--into", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert "not a readable GGUF file" in err and len(err.splitlines()) == 1
