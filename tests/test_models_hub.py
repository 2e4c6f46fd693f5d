"""Models by name, offline: a repo id from a local Hugging Face cache, a .gguf file, --dtype, --device auto."""

from __future__ import annotations

import socket

import pytest
import torch

from helpers import tiny
from helpers.hub import write_cached_repo
from amygdala import AmygdalaError
from amygdala.cli.main import main
from amygdala.models import load_model, model_info, resolve_model


@pytest.fixture()
def hub(tmp_path, monkeypatch, tiny_llama_dir):
    """A temporary HF cache holding the tiny Llama as ``org/tiny``, offline, and any socket connect an error."""
    cache = tmp_path / "hf" / "hub"
    snapshot = write_cached_repo(cache, "org/tiny", tiny_llama_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = []

    def no_network(self, address):
        tried.append(address)
        raise OSError(f"test: network use attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache, snapshot, tried


def test_repo_id_resolves_to_the_cached_snapshot_and_loads_the_same_weights(hub, tiny_llama_dir):
    cache, snapshot, tried = hub
    assert resolve_model("org/tiny") == snapshot
    model, tok, info = load_model("org/tiny", "cpu")
    assert info.name == "org/tiny"  # the repo id, not the snapshot's commit hash
    ref, _, _ = load_model(tiny_llama_dir, "cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok("w1 w2")["input_ids"] == tiny.make_tokenizer()("w1 w2")["input_ids"]
    assert tried == []


def test_uncached_repo_id_names_the_cache_and_how_to_fill_it_without_network(hub, capsys):
    cache, _, tried = hub
    with pytest.raises(AmygdalaError) as e:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(cache) in msg and "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct" in msg
    assert "models--Qwen--Qwen2.5-0.5B-Instruct" in msg
    # The same through the command line: exit 2 and the one line, before any readout or corpus work.
    assert main(["build", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--out", str(cache.parent / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model Qwen/Qwen2.5-0.5B-Instruct: not in the local Hugging Face cache") and "\n" not in err
    assert tried == []


def test_hf_home_is_used_when_hf_hub_cache_is_unset(tmp_path, monkeypatch, tiny_llama_dir):
    write_cached_repo(tmp_path / "home" / "hub", "org/tiny", tiny_llama_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert model_info(resolve_model("org/tiny")).name == "org/tiny"


def test_a_snapshot_without_config_is_refused(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    write_cached_repo(tmp_path / "c", "org/broken", tmp_path / "m")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    with pytest.raises(AmygdalaError, match="no config.json"):
        resolve_model("org/broken")


def test_an_existing_folder_named_like_a_repo_id_stays_a_folder(tmp_path, monkeypatch, tiny_llama_dir):
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_model("org/tiny").resolve() == (tmp_path / "org" / "tiny").resolve()


def test_build_by_repo_id_with_model_dtype_writes_the_repo_name(hub, synthetic_corpus, tmp_path):
    from amygdala.readout import Readout

    out = tmp_path / "out"
    assert main(["build", "--model", "org/tiny", "--corpus", str(synthetic_corpus), "--out", str(out),
                 "--layers", "1,2", "--model-dtype", "float32", "--device", "cpu", "--quiet"]) == 0
    assert Readout.load(out).meta["model"]["name"] == "org/tiny"


def test_dtype_names_load_in_that_dtype_and_a_bad_one_is_refused(tiny_llama_dir):
    model, _, _ = load_model(tiny_llama_dir, "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(AmygdalaError, match="--dtype 'int3'"):
        load_model(tiny_llama_dir, "cpu", "int3")


def test_read_parser_takes_dtype_and_build_keeps_dtype_for_its_vectors():
    from amygdala.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["read", "hi", "--readout", "r", "--dtype", "bfloat16", "--device", "auto"])
    assert (args.model_dtype, args.device) == ("bfloat16", "auto")
    args = parser.parse_args(["build", "--out", "o", "--dtype", "float16", "--model-dtype", "bfloat16"])
    assert (args.dtype, args.model_dtype) == ("float16", "bfloat16")


def test_device_auto_uses_device_map_auto(tiny_llama_dir):
    """On this CPU-only machine accelerate places every layer on the CPU (a spread over several
    GPUs is not testable here): the model loads through device_map="auto" and computes the same logits."""
    model, tok, _ = load_model(tiny_llama_dir, "auto", "float32")
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    ref, _, _ = load_model(tiny_llama_dir, "cpu")
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids.to(model.device)).logits.cpu(), ref(ids).logits, atol=1e-5)


def test_gguf_that_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(AmygdalaError) as e:
        resolve_model(bad)
    assert "transformers cannot dequantise this GGUF" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AmygdalaError, match="no such .gguf file"):
        resolve_model(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_any_gguf_file_converts_once_like_the_default_model(tmp_path, monkeypatch):
    """The default model's own GGUF, given as a path: dequantised into AMYGDALA_HOME once, and the
    same weights as the converted default model."""
    import importlib.util
    from pathlib import Path

    from amygdala.models.resolve import DEFAULT_GGUF, DEFAULT_PACKAGE

    default = resolve_model("default")
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    folder = resolve_model(gguf)
    assert folder.parent == tmp_path / "home" / "models" and (folder / "config.json").is_file()
    assert resolve_model(str(gguf)) == folder  # cached: the second call converts nothing
    from safetensors.torch import load_file

    a, b = load_file(folder / "model.safetensors"), load_file(default / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
