"""amygdala export / import: llama.cpp control-vector GGUFs, repeng and steering-vectors files.

What each test proves is in its docstring. The layer numbering is checked three ways: the GGUF
bytes parsed here independently and put through llama.cpp's loader rules (common.cpp) and its
adapter's slot rules (llama-adapter.cpp); the file read by llama.cpp's own gguf parser when
llama-cpp-python is installed; and (slow, tests/test_interop_llamacpp.py) the default model steered
inside llama.cpp against amygdala's own steering at the same layer and its neighbours.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny
from helpers.llama_cpp import llama_cpp_added, llama_cpp_control_vector, parse_gguf
from helpers.llama_cpp import llama_cpp_or_skip as _llama_cpp
from amygdala.cli.main import main
from amygdala.interop import InteropError, add_concept, from_readout, read_vectors, write_vectors
from amygdala.readout import Readout, Steering, attach

EXT = {"gguf": "gguf", "repeng": "gguf", "steering-vectors": "pt"}
MIX = ["--concept", "alpha", "--concept", "beta=-0.5"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model folder, corpus folder, readout folder): a tiny Llama's readout at layers 1 and 2, with statistics."""
    root = tmp_path_factory.mktemp("interop")
    model, tok = tiny.make_model("llama", root / "model")
    corpus = tiny.write_corpus(root / "corpus")
    assert main(["build", "--corpus", str(corpus), "--model", str(root / "model"), "--layers", "1,2",
                 "--out", str(root / "readout"), "--quiet"]) == 0
    return root / "model", corpus, root / "readout"


@pytest.fixture()
def readout_copy(built, tmp_path):
    """A fresh copy of the built readout folder that a test may add concepts to."""
    import shutil

    return Path(shutil.copytree(built[2], tmp_path / "readout"))


def test_gguf_bytes_are_what_llama_cpp_loads_at_the_same_layers(built, tmp_path):
    """The GGUF holds architecture controlvector, a model hint, an int32 layer count (as
    llama.cpp's cvector-generator writes them) and one F32 1-D direction.<L> per readout layer
    with exactly our float32 values; put through llama.cpp's loader and adapter rules, it adds
    our steering vector after block L (our layer L) and nothing anywhere else: no offset."""
    _, _, folder = built
    readout = Readout.load(folder)
    vectors = from_readout(readout, {"alpha": 1.0, "beta": -0.5}, strength=3.0)
    path = write_vectors(vectors, tmp_path / "mix.gguf", "gguf")
    f = parse_gguf(path.read_bytes())
    assert f["version"] == 3
    assert f["kv"]["general.architecture"] == (8, "controlvector")
    assert f["kv"]["controlvector.model_hint"] == (8, "model")
    assert f["kv"]["controlvector.layer_count"] == (5, 2)  # GGUF type 5 = int32
    assert f["order"] == ["direction.1", "direction.2"]
    steering = Steering.from_concepts(readout, {"alpha": 3.0, "beta": -1.5})
    for l in readout.layers:
        dims, ggml_type, values = f["tensors"][f"direction.{l}"]
        assert dims == [64] and ggml_type == 0
        assert values.tobytes() == vectors.directions[l].numpy().astype("<f4").tobytes()
        torch.testing.assert_close(torch.from_numpy(values.copy()), steering.deltas[l], rtol=1e-6, atol=1e-6)
    added = llama_cpp_added(path, n_layer=4, strength=2.0)
    assert sorted(l for l, v in added.items() if np.any(v)) == readout.layers
    for l in readout.layers:
        np.testing.assert_array_equal(added[l], 2.0 * vectors.directions[l].numpy())


def test_gguf_round_trip_gives_the_readout_vectors_back(built, tmp_path):
    """Export then import: the concept comes back as the readout's own unit vectors (to float32),
    the file's norm per layer is the exported strength, and readout.json says where it came from."""
    _, _, folder = built
    readout = Readout.load(folder)
    path = write_vectors(from_readout(readout, {"beta": 1.0}, strength=5.0), tmp_path / "beta.gguf", "gguf")
    vectors, fmt = read_vectors(path)
    assert fmt == "gguf" and vectors.layers == readout.layers and vectors.model_hint == "model"
    assert vectors.origin["concepts"] == {"beta": 1.0} and vectors.origin["strength"] == 5.0
    updated = add_concept(readout, vectors, "beta_again", {"from": str(path), "format": fmt})
    b = readout.concept_index("beta")
    for l in readout.layers:
        torch.testing.assert_close(vectors.directions[l], 5.0 * readout.vectors[l][b], rtol=0, atol=0)
        torch.testing.assert_close(updated.vectors[l][-1], readout.vectors[l][b], rtol=1e-6, atol=1e-7)
    assert updated.meta["imported"]["beta_again"]["norms"] == pytest.approx({"1": 5.0, "2": 5.0})


@pytest.mark.parametrize("fmt", ["gguf", "repeng", "steering-vectors"])
def test_cli_round_trip_adds_the_concept_with_statistics(built, readout_copy, tmp_path, capsys, fmt):
    """`amygdala export` then `amygdala import` into the readout: the mix comes back as its unit
    direction at both layers, its z-score statistics are measured like the build's (a copy of
    alpha gets alpha's mean and std), and readout.json records the file, its hash and origin."""
    model, corpus, _ = built
    out = tmp_path / f"mix.{EXT[fmt]}"
    assert main(["export", "--readout", str(readout_copy), *MIX, "--strength", "3", "--format", fmt, "--out", str(out)]) == 0
    assert main(["export", "--readout", str(readout_copy), "--concept", "alpha", "--format", fmt,
                 "--out", str(tmp_path / f"alpha.{EXT[fmt]}")]) == 0
    for name, path in (("mix", out), ("alpha_copy", tmp_path / f"alpha.{EXT[fmt]}")):
        assert main(["import", "--from", str(path), "--name", name, "--into", str(readout_copy), "--model", str(model),
                     "--corpus", str(corpus), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "imported mix" in printed and "norm per layer 1: 3" in printed
    before, after = Readout.load(built[2]), Readout.load(readout_copy)
    assert after.concepts == [*before.concepts, "mix", "alpha_copy"] and after.has_stats
    a, b = before.concept_index("alpha"), before.concept_index("beta")
    for l in before.layers:
        mix = before.vectors[l][a] - 0.5 * before.vectors[l][b]
        torch.testing.assert_close(after.vectors[l][-2], mix / mix.norm(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after.vectors[l][-1], before.vectors[l][a], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(after.mean[l][-1], before.mean[l][a], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.std[l][-1], before.std[l][a], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.vectors[l][:3], before.vectors[l])  # the built concepts are untouched
    info = json.loads((readout_copy / "readout.json").read_text())
    record = info["imported"]["mix"]
    assert record["format"] == ("steering-vectors" if fmt == "steering-vectors" else "gguf")
    assert len(record["sha256"]) == 64 and record["from"] == str(out.resolve())
    assert record["layers_in_file"] == [1, 2] and record["layers_unused"] == []
    if fmt != "steering-vectors":  # the GGUF carries amygdala's origin record; the pickle stays the library's object
        assert record["origin"]["concepts"] == {"alpha": 1.0, "beta": -0.5} and record["origin"]["strength"] == 3.0
    assert info["clusters"][-2:] == ["imported", "imported"]
    # The per-concept lists stay aligned with the concepts (the page reads them by index).
    assert info["valence"][-2:] == [None, None] and info["descriptions"][-2:] == ["", ""]
    assert all(len(info[k]) == len(info["concepts"]) for k in ("clusters", "valence", "arousal", "descriptions"))


def test_import_into_a_new_readout_keeps_the_files_layers(built, tmp_path):
    """A vector with layers the readout lacks goes into a new readout checked against --model:
    the file's own layers, unit rows, no statistics (reads as raw projections)."""
    model, _, _ = built
    directions = {l: tiny.random_unit(64, l) * (l + 1) for l in (0, 1, 3)}
    from amygdala.interop import LayerVectors

    path = write_vectors(LayerVectors(directions, "llama"), tmp_path / "v.gguf", "repeng")  # repeng may steer layer 0
    assert main(["import", "--from", str(path), "--name", "thing", "--into", str(tmp_path / "new"), "--model", str(model)]) == 0
    r = Readout.load(tmp_path / "new")
    assert r.concepts == ["thing"] and r.layers == [0, 1, 3] and not r.has_stats
    for l in r.layers:
        torch.testing.assert_close(r.vectors[l][0], directions[l] / (l + 1), rtol=1e-6, atol=1e-7)
    assert r.meta["model"] == {"name": "model", "num_layers": 4}
    assert r.meta["imported"]["thing"]["model_hint"] == "llama"


# --------------------------------------------------------------------------- repeng
def test_repeng_gguf_is_what_repeng_reads(built, tmp_path):
    """repeng's export_gguf conventions: uint32 layer_count, the model hint its import_gguf
    requires, direction.<layer> keyed by block; read back the way import_gguf reads it (the
    gguf package's reader, last part of each field, tensor data) gives our vectors."""
    import gguf

    readout = Readout.load(built[2])
    vectors = from_readout(readout, {"gamma": 1.0}, strength=2.0, model_hint="llama")
    path = write_vectors(vectors, tmp_path / "gamma.gguf", "repeng")
    f = parse_gguf(path.read_bytes())
    assert f["kv"]["controlvector.layer_count"] == (4, 2)  # GGUF type 4 = uint32, as repeng writes it
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    hint = reader.get_field("controlvector.model_hint")
    assert bytes(arch.parts[-1]).decode() == "controlvector" and bytes(hint.parts[-1]).decode() == "llama"
    directions = {int(t.name.split(".")[1]): np.array(t.data) for t in reader.tensors}
    assert sorted(directions) == readout.layers
    for l in readout.layers:
        np.testing.assert_array_equal(directions[l], vectors.directions[l].numpy())


@pytest.fixture()
def repeng_class(monkeypatch):
    """repeng's ControlVector class under its import path, so pickles name it as repeng's do.
    repeng itself is not installed (and must not become a dependency): this is its dataclass's
    shape (model_type, directions: dict[int, np.ndarray]), read from its source."""
    @dataclass
    class ControlVector:
        model_type: str
        directions: dict

    ControlVector.__module__, ControlVector.__qualname__ = "repeng.extract", "ControlVector"
    package, module = types.ModuleType("repeng"), types.ModuleType("repeng.extract")
    module.ControlVector, package.extract = ControlVector, module
    monkeypatch.setitem(sys.modules, "repeng", package)
    monkeypatch.setitem(sys.modules, "repeng.extract", module)
    return ControlVector


@pytest.mark.parametrize("save", ["pickle", "torch"])
def test_repeng_pickles_import_without_repeng(repeng_class, built, tmp_path, monkeypatch, save):
    """A pickled or torch.save'd repeng ControlVector (numpy float32 directions) reads as its
    layer vectors, with no repeng importable at read time."""
    directions = {l: tiny.random_unit(64, 10 + l).numpy() * 3 for l in (1, 2, 3)}
    vector = repeng_class(model_type="llama", directions=directions)
    path = tmp_path / f"v.{save}"
    if save == "pickle":
        path.write_bytes(pickle.dumps(vector))
    else:
        torch.save(vector, path)
    monkeypatch.delitem(sys.modules, "repeng.extract")
    monkeypatch.delitem(sys.modules, "repeng")
    vectors, fmt = read_vectors(path)
    assert fmt == "repeng" and vectors.model_hint == "llama" and vectors.layers == [1, 2, 3]
    for l, d in directions.items():
        np.testing.assert_array_equal(vectors.directions[l].numpy(), d)
    readout = add_concept(Readout.load(built[2]), vectors, "from_repeng", {"from": str(path)})
    assert readout.meta["imported"]["from_repeng"]["layers_unused"] == [3]


# --------------------------------------------------------------------------- steering-vectors (the oracle)
def test_steering_vectors_applies_our_file_exactly_as_we_steer(built, tmp_path):
    """The exported file loads as steering-vectors' own SteeringVector; its apply() at
    multiplier m changes the residual stream and logits as amygdala's attach() does at
    strength m x the exported strength: the block outputs it steers differ from unsteered by
    our vector, and every hidden state and logit agrees with ours."""
    import steering_vectors

    model_dir, _, folder = built
    readout = Readout.load(folder)
    path = write_vectors(from_readout(readout, {"alpha": 1.0, "beta": -0.5}, strength=3.0), tmp_path / "mix.pt",
                         "steering-vectors")
    sv = torch.load(path, weights_only=False)
    assert type(sv) is steering_vectors.SteeringVector and sv.layer_type == "decoder_block"
    with torch.serialization.safe_globals([steering_vectors.SteeringVector]):
        assert torch.load(path).layer_activations.keys() == sv.layer_activations.keys()  # loads with weights_only too
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)("w1 w2 al3 be4 w5", return_tensors="pt")
    blocks = model.model.layers
    m = 4.0

    def run(ctx):
        seen = {}
        hooks = [blocks[l + 1].register_forward_pre_hook(lambda _m, a, l=l: seen.__setitem__(l, a[0].clone()))
                 for l in readout.layers]
        try:
            with torch.no_grad(), ctx:
                logits = model(**ids).logits
        finally:
            for h in hooks:
                h.remove()
        return seen, logits

    import contextlib

    plain, plain_logits = run(contextlib.nullcontext())
    theirs, their_logits = run(sv.apply(model, multiplier=m))
    ours, our_logits = run(attach(model, readout, steering=Steering.from_concepts(readout, {"alpha": m * 3, "beta": -m * 1.5}),
                                  record=False))
    first = readout.layers[0]
    torch.testing.assert_close(theirs[first] - plain[first], (m * sv.layer_activations[first]).expand_as(plain[first]),
                               rtol=1e-5, atol=1e-5)
    assert (their_logits - plain_logits).abs().max() > 0.1  # the steering is not negligible
    for l in readout.layers:
        torch.testing.assert_close(theirs[l], ours[l], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(their_logits, our_logits, rtol=1e-5, atol=1e-5)


def test_steering_vectors_own_files_import(built, tmp_path):
    """torch.save of a SteeringVector made by the library, or of its layer_activations dict,
    imports; one of another layer_type (a different site) is refused."""
    import steering_vectors

    acts = {1: tiny.random_unit(64, 1) * 2, 2: tiny.random_unit(64, 2) * 3}
    torch.save(steering_vectors.SteeringVector(layer_activations=acts), tmp_path / "sv.pt")
    torch.save(acts, tmp_path / "acts.pt")
    for name in ("sv.pt", "acts.pt"):
        vectors, fmt = read_vectors(tmp_path / name)
        assert fmt == "steering-vectors" and vectors.layers == [1, 2]
        for l in acts:
            torch.testing.assert_close(vectors.directions[l], acts[l], rtol=0, atol=0)
    torch.save(steering_vectors.SteeringVector(layer_activations=acts, layer_type="attention"), tmp_path / "attn.pt")
    with pytest.raises(InteropError, match="layer_type 'attention'"):
        read_vectors(tmp_path / "attn.pt")


# --------------------------------------------------------------------------- bad input
class _Boom:
    def __reduce__(self):
        return (Path("/nonexistent-sentinel").touch, ())


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    import gguf

    files = {}
    w = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    files["model"] = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(tmp_path / "odd.gguf", "controlvector")
    w.add_tensor("direction.x", np.zeros(64, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    files["odd"] = tmp_path / "odd.gguf"
    (tmp_path / "text.txt").write_text("calm\n")
    files["text"] = tmp_path / "text.txt"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Boom()))
    files["evil"] = tmp_path / "evil.pkl"
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    files["other"] = tmp_path / "other.pt"
    return files


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--concept", "alpah", "--format", "gguf"], "unknown concept 'alpah'; nearest: alpha"),
        (["export", "--concept", "alpha", "--format", "ggml"], "--format 'ggml': unknown; expected one of gguf, repeng, steering-vectors (nearest: gguf)"),
        (["export", "--concept", "alpha=lots", "--format", "gguf"], "--concept: 'alpha=lots': 'lots' is not a number"),
        (["export", "--concept", "alpha", "--format", "gguf", "--layers", "3"], "--layers [3]: not in the readout (it has layers [1, 2])"),
        (["export", "--concept", "alpha", "--format", "gguf", "--strength", "nan"], "--strength nan: must be a finite number"),
        (["import", "--from", "model", "--name", "x"], "general.architecture is 'llama', not 'controlvector'"),
        (["import", "--from", "odd", "--name", "x"], "tensor 'direction.x' is not direction.<layer>"),
        (["import", "--from", "text", "--name", "x"], "not a control vector file"),
        (["import", "--from", "evil", "--name", "x"], "not a steering vector that can be loaded safely"),
        (["import", "--from", "other", "--name", "x"], "holds a dict, not a SteeringVector"),
        (["import", "--from", "good", "--name", "alpha"], "--name 'alpha': the readout already has a concept of that name"),
        (["import", "--from", "wide", "--name", "x"], "vectors of size 32 do not fit the readout's model (hidden size 64)"),
        (["import", "--from", "deep", "--name", "x"], "layer(s) [7] do not exist in the readout's model (4 layers, 0-3)"),
        (["import", "--from", "sparse", "--name", "x"], "no vector for the readout's layer(s) [2] (the file has [1, 3])"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(built, readout_copy, tmp_path, capsys, args, message):
    """Each mistake is one line naming the file or flag (exit 2), found before the model loads
    (its weights are deleted here, so a load would fail differently) and leaving no file behind."""
    from amygdala.interop import LayerVectors

    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(built[0], model_dir)
    (model_dir / "model.safetensors").unlink()
    files = _bad_files(tmp_path)
    files["good"] = write_vectors(LayerVectors({1: torch.ones(64), 2: torch.ones(64)}), tmp_path / "good.gguf", "gguf")
    files["wide"] = write_vectors(LayerVectors({1: torch.ones(32), 2: torch.ones(32)}), tmp_path / "wide.gguf", "gguf")
    files["deep"] = write_vectors(LayerVectors({1: torch.ones(64), 2: torch.ones(64), 7: torch.ones(64)}), tmp_path / "deep.gguf", "gguf")
    files["sparse"] = write_vectors(LayerVectors({1: torch.ones(64), 3: torch.ones(64)}), tmp_path / "sparse.gguf", "gguf")
    if args[0] == "export":
        argv = [*args, "--readout", str(readout_copy), "--out", str(tmp_path / "out.gguf")]
    else:
        argv = ["import", "--from", str(files[args[2]]), *args[3:], "--into", str(readout_copy), "--model", str(model_dir)]
    before = (readout_copy / "readout.json").read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (readout_copy / "readout.json").read_text() == before and not (tmp_path / "out.gguf").exists()
    assert not Path("/nonexistent-sentinel").exists()  # the hostile pickle ran nothing


def test_layer_zero_cannot_go_to_llama_cpp(built, tmp_path):
    """llama.cpp's loader rejects direction.0 (it has no slot before block 1), so the gguf export
    refuses layer 0 with a way out; repeng's GGUF keeps it (repeng steers block 0)."""
    from amygdala.interop import LayerVectors

    vectors = LayerVectors({0: torch.ones(64), 1: torch.ones(64)})
    with pytest.raises(InteropError, match="layer 0: llama.cpp's control vectors cannot steer after block 0"):
        write_vectors(vectors, tmp_path / "v.gguf", "gguf")
    assert not (tmp_path / "v.gguf").exists()
    path = write_vectors(vectors, tmp_path / "r.gguf", "repeng")
    assert read_vectors(path)[0].layers == [0, 1]
    with pytest.raises(AssertionError, match="invalid \\(zero\\) direction"):
        llama_cpp_added(path, n_layer=4)


# --------------------------------------------------------------------------- llama.cpp itself
@pytest.mark.llamacpp
def test_llama_cpps_own_gguf_parser_reads_our_file(built, tmp_path):
    """llama.cpp's gguf code (not ours, not the gguf package) parses the export: the keys with
    their types, direction tensors it accepts, and our float32 vector at buffer slot L - 1,
    which llama_adapter_cvec gives to block L."""
    llama_cpp = _llama_cpp()
    readout = Readout.load(built[2])
    vectors = from_readout(readout, {"alpha": 1.0, "gamma": 0.25}, strength=2.5)
    path = write_vectors(vectors, tmp_path / "v.gguf", "gguf")
    n_embd, buf, keys = llama_cpp_control_vector(llama_cpp, path, strength=2.0)
    assert keys == {"general.architecture": (8, "controlvector"), "controlvector.model_hint": (8, "model"),
                    "controlvector.layer_count": (5, 2)}
    assert n_embd == 64 and buf.size == 64 * max(readout.layers)
    for l in readout.layers:
        np.testing.assert_array_equal(buf[64 * (l - 1): 64 * l], 2.0 * vectors.directions[l].numpy())
