"""The model card (readout/card.py): written by every save, names the right weights, method,
layers and corpus, carries the save's pair id, and its rebuild command builds the same vectors."""

from __future__ import annotations

import json
import re
import shlex

import torch

from amygdala.cli.main import main
from amygdala.models.weights import file_sha256
from amygdala.readout import Readout
from amygdala.readout.card import CARD, model_card


def _build(model, corpus, out, *extra):
    argv = ["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0


def test_card_names_weights_method_layers_and_its_command_rebuilds_the_same_vectors(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    model, corpus, _ = planted
    out = tmp_path / "out"
    _build(model, corpus, out, "--method", "logistic", "--method-param", "C=0.5", "--pooling", "mean")
    card = (out / CARD).read_text()
    info = json.loads((out / "readout.json").read_text())
    assert f"`{info['pair']}`" in card  # the card is of this save
    assert f"sha256 `{file_sha256(model / 'model.safetensors')}`" in card
    assert "- method: logistic (C=0.5)" in card and "- pooling: mean;" in card
    assert "- layers: 1 (33% depth), 2 (67% depth)" in card  # 4 layers: 1/3, 2/3
    assert f"sha256 `{info['corpus']['sha256']}`" in card
    assert "amygdala eval --readout THIS_FOLDER" in card  # no eval here: how to get one
    command = re.search(r"## Rebuild\n\n```\n(.+)\n```", card).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["amygdala", "build"]
    again = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(again)
    assert main([*argv[1:], "--quiet"]) == 0
    a, b = Readout.load(out), Readout.load(again)
    assert a.layers == b.layers == [1, 2] and a.concepts == b.concepts
    for l in a.layers:
        assert torch.equal(a.vectors[l], b.vectors[l])
        assert torch.equal(a.mean[l], b.mean[l]) and torch.equal(a.std[l], b.std[l])
    assert b.meta["method_params"] == a.meta["method_params"] and b.pooling == "mean"


def test_every_save_refreshes_the_card_with_its_pair_and_the_folders_eval(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    model, corpus, _ = planted
    out = tmp_path / "out"
    _build(model, corpus, out)
    r = Readout.load(out)
    first = (out / CARD).read_text()
    evaluation = {"concepts": r.concepts, "validity": {
        "heldout": {"1": {"n": 9, "concept_top1": 0.5, "concept_top5": 1.0, "cluster_top1": 0.75}},
        "geometry": {"1": {"pc1_valence_r": 0.81, "pc2_arousal_r": 0.33}}}}
    (out / "eval.json").write_text(json.dumps(evaluation))
    r.save(out)  # any writer: import --into saves the same way
    card = (out / CARD).read_text()
    pair = json.loads((out / "readout.json").read_text())["pair"]
    assert card != first and f"`{pair}`" in card and f"`{r.meta['pair']}`" not in card
    assert "| 1 | 50.0% | 100.0% | 75.0% | 0.81 | 0.33 |" in card
    assert "amygdala eval --readout" not in card
    # An eval of other concepts is not this readout's: not shown.
    (out / "eval.json").write_text(json.dumps({**evaluation, "concepts": ["other"]}))
    Readout.load(out).save(out)
    assert "amygdala eval --readout" in (out / CARD).read_text()
    assert model_card(Readout.load(out)) == (out / CARD).read_text()  # the loaded pair id is the card's


def test_import_into_refreshes_the_card(planted, tmp_path, monkeypatch):
    from amygdala.interop import LayerVectors, write_vectors

    monkeypatch.setenv("AMYGDALA_HOME", str(tmp_path / "home"))
    model, corpus, _ = planted
    out = tmp_path / "out"
    _build(model, corpus, out)
    vec = tmp_path / "v.gguf"
    write_vectors(LayerVectors({1: torch.ones(64), 2: torch.ones(64)}, "llama"), vec, "gguf")
    assert main(["import", "--from", str(vec), "--name", "extra", "--into", str(out), "--model", str(model), "--quiet"]) == 0
    card = (out / CARD).read_text()
    assert f"`{json.loads((out / 'readout.json').read_text())['pair']}`" in card
    assert "imported concepts" in card and "extra from" in card
