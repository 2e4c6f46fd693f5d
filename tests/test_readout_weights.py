"""The readout records the weights it was built from; read refuses other weights unless told."""

import json
import os

from amygdala.cli.main import main
from amygdala.models.weights import file_sha256
from amygdala.readout import Readout


def _flip_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def test_build_records_weights_and_read_refuses_changed_ones(planted, tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    model, corpus, _ = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(out), "--quiet"]) == 0
    rec = Readout.load(out).weights
    weights = model / "model.safetensors"
    assert rec["files"][0]["name"] == "model.safetensors" and rec["files"][0]["sha256"] == file_sha256(weights)
    assert rec["dtype"] == "F32" and rec["loaded_as"] == "float32"
    assert Readout.load(out).check_weights(model) == []
    assert main(["read", "--readout", str(out), "--model", str(model), "w1 w2"]) == 0
    _flip_byte(weights)
    capsys.readouterr()
    assert main(["read", "--readout", str(out), "--model", str(model), "w1 w2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "--allow-other-weights" in err[0]
    assert rec["files"][0]["sha256"][:12] in err[0]
    assert main(["read", "--readout", str(out), "--model", str(model), "--allow-other-weights", "w1 w2"]) == 0
    assert len(Readout.load(out).check_weights(model)) == 1
    # an old file without the record: warns, still reads
    meta = json.loads((out / "readout.json").read_text())
    meta["model"].pop("weights")
    (out / "readout.json").write_text(json.dumps(meta))
    caplog.clear()
    assert main(["read", "--readout", str(out), "--model", str(model), "w1 w2"]) == 0
    assert any("records no model weights" in r.getMessage() for r in caplog.records)


def test_digest_cache_follows_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    first = file_sha256(f)
    assert (tmp_path / "home" / "digests.json").is_file()
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size; restore the mtime: the cache (by design) answers the old digest
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_sha256(f) != first
    f.write_bytes(b"b" * 101)
    assert file_sha256(f) not in (first,)


def test_serve_refuses_other_weights_before_vllm_starts(planted, tmp_path, monkeypatch):
    import argparse

    import pytest

    from amygdala import AmygdalaError
    from amygdala.serve.launch import vllm_argv

    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AMYGDALA_API_KEY", raising=False)
    model, corpus, _ = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(out), "--quiet"]) == 0
    _flip_byte(model / "model.safetensors")
    args = argparse.Namespace(readout=out, model=str(model), host="127.0.0.1", port=8000, vllm_args=[],
                              allow_remote_training=False, no_page=False, allow_other_weights=False)
    with pytest.raises(AmygdalaError, match="model.safetensors.*--allow-other-weights"):
        vllm_argv(args)
