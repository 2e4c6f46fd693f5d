"""``amygdala read``/``generate`` with ``--concepts``, ``--clusters``, ``--layers``: the shown rows
are the matching slice of the full ones (tiny planted model), and a bad filter exits 2 naming its
flag before the model loads."""

from __future__ import annotations

import json
import re

import pytest

from amygdala.cli.main import main
from amygdala.readout import Readout


@pytest.fixture()
def built(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    return model, out


def _read(capsys, model, out, *extra) -> dict:
    assert main(["read", "--readout", str(out), "--model", str(model), "--json", "--top", "3", *extra, "w1 al3 be2 al4"]) == 0
    return json.loads(capsys.readouterr().out)


def test_read_filter_is_the_slice_of_the_full_readout(built, capsys):
    model, out = built
    full = _read(capsys, model, out)
    assert "select" not in full and full["layers"] == [1, 2]  # unfiltered: as before
    got = _read(capsys, model, out, "--concepts", "gamma,alpha", "--layers", "2")
    assert got["layers"] == [2] and got["select"] == {"concepts": ["alpha", "gamma"], "layers": [2]}
    assert len(got["tokens"]) == len(full["tokens"])
    for f, g in zip(full["tokens"], got["tokens"]):
        assert list(g["layers"]) == ["2"]
        assert g["layers"]["2"] == [cv for cv in f["layers"]["2"] if cv[0] in ("alpha", "gamma")]
    # The tracks are averaged over the kept layers: layer 1's and layer 2's average to the full one.
    one = _read(capsys, model, out, "--layers", "1")
    for f, g, h in zip(full["tokens"], got["tokens"], one["tokens"]):
        for name, value in f.get("tracks", {}).items():
            assert (g["tracks"][name] + h["tracks"][name]) / 2 == pytest.approx(value, abs=2e-3)
    # A cluster selects its members (the corpus's clusters, as the file records them).
    clusters = Readout.load(out).concept_info("clusters")
    cluster = clusters[1]
    members = [c for c, k in zip(["alpha", "beta", "gamma"], clusters) if k == cluster]
    got = _read(capsys, model, out, "--clusters", cluster)
    assert got["select"]["concepts"] == members
    for f, g in zip(full["tokens"], got["tokens"]):
        for layer in ("1", "2"):
            assert g["layers"][layer] == [cv for cv in f["layers"][layer] if cv[0] in members]


CELL = re.compile(r"L(\d+): ((?:[a-z]+ [+-][\d.]+(?:, )?)+)")


def _cells(text: str) -> list[dict[str, list[str]]]:
    """Per printed token line: layer -> its 'name value' cells."""
    return [{m[0]: m[1].split(", ") for m in CELL.findall(line)} for line in text.splitlines() if CELL.search(line)]


def test_generate_show_readout_filtered(built, capsys):
    model, out = built
    base = ["generate", "--readout", str(out), "--model", str(model), "--raw", "--max-new-tokens", "5",
            "--show-readout", "--top", "3", "w1 w2"]
    assert main(base) == 0
    full = _cells(capsys.readouterr().out)
    assert main([*base, "--concepts", "beta", "--layers", "1"]) == 0
    got = _cells(capsys.readouterr().out)
    assert len(got) == len(full) >= 1  # the tiny model may end early (its eos)
    for f, g in zip(full, got):
        assert list(g) == ["1"] and g["1"] == [c for c in f["1"] if c.startswith("beta ")]


@pytest.mark.parametrize("flags, words", [
    (["--concepts", "alhpa"], ["--concepts", "unknown concept", "alpha"]),
    (["--clusters", "nope"], ["--clusters", "unknown cluster"]),
    (["--layers", "3"], ["--layers", "not one of the readout's layers [1, 2]"]),
    (["--layers", "x"], ["--layers", "expected layer indices"]),
])
def test_bad_filter_flags_exit_2_naming_the_flag(built, capsys, flags, words):
    model, out = built
    for job in ("read", "generate"):
        assert main([job, "--readout", str(out), "--model", str(model / "missing"), *flags, "w1"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def _scored(model, out, text: str):
    """What ``read`` scores: the readout's default statistics, smoothed over its default window."""
    from amygdala.models import load_model
    from amygdala.readout import DEFAULT_SMOOTH, score_text

    m, tok, _ = load_model(str(model), "cpu")
    return score_text(m, tok, Readout.load(out), text, smooth=DEFAULT_SMOOTH)


def test_read_summary_is_the_mean_and_max_of_the_kept_slice(built, capsys):
    """``read --summary``: per kept layer and concept the mean and max over the tokens, the
    attention sink left out, computed here with numpy from the full matrix."""
    import numpy as np

    model, out = built
    text = "w1 al3 be2 al4"
    got = _read(capsys, model, out, "--summary", "--concepts", "gamma,alpha", "--layers", "2")
    readout = Readout.load(out)
    scored = _scored(model, out, text)
    real = [i for i, p in enumerate(scored.positions) if p != 0]
    part = scored.scores.numpy()[real][:, [readout.layers.index(2)]][:, :, [readout.concept_index("alpha"), readout.concept_index("gamma")]]
    assert got["concepts"] == ["alpha", "gamma"] and got["layers"] == [2]
    assert got["summary"]["tokens"] == len(real) >= 2
    np.testing.assert_allclose(got["summary"]["mean"], part.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["summary"]["max"], part.max(0), rtol=1e-5, atol=1e-6)
    whole = _read(capsys, model, out, "--summary")
    assert whole["concepts"] == readout.concepts and whole["layers"] == readout.layers
    # The text form ranks each layer's concepts by mean.
    assert main(["read", "--readout", str(out), "--model", str(model), "--summary", "--layers", "2", text]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(real)} tokens") and lines[1].startswith("L2: ")
    means = [float(cell.split(" mean ")[1].split()[0]) for cell in lines[1][4:].split(", ")]
    assert means == sorted(means, reverse=True) and len(means) == 3


def test_generate_summary_prints_one_line_per_kept_layer(built, capsys):
    model, out = built
    assert main(["generate", "--readout", str(out), "--model", str(model), "--raw", "--max-new-tokens", "5",
                 "--summary", "--layers", "1", "--top", "2", "w1 w2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if " tokens (" in line)
    assert [line[:4] for line in lines[at + 1:]] == ["L1: "] and lines[at + 1].count(" mean ") == 2


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_file_keeps_only_the_selected_concepts_and_layers(built, tmp_path, capsys):
    """``read --file`` with a filter: the table's columns are the kept concepts (named with the
    kept layers when some are left out) and its values the same as the full table's slice."""
    model, out = built
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["w1 al3 be2 al4", "ga1 w2 ga3", ""])))
    base = ["read", "--readout", str(out), "--model", str(model), "--quiet", "--file", str(src)]

    def run(name: str, *extra: str) -> list[dict]:
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0, capsys.readouterr().err
        return _rows(tmp_path / name)

    full = run("full.jsonl")
    alpha = run("alpha.jsonl", "--concepts", "alpha")
    assert [k for k in alpha[0] if "." in k] == ["alpha.mean", "alpha.max"]
    for f, a in zip(full, alpha):
        assert (a["alpha.mean"], a["alpha.max"], a["top"], a["emotionality"]) == (f["alpha.mean"], f["alpha.max"], "alpha" if f["n_tokens"] > 1 else "", f["emotionality"])
    # Layer 2 alone: its own values, and columns that say so.
    one = run("l2.jsonl", "--concepts", "alpha", "--layers", "2")
    assert [k for k in one[0] if k not in ("id", "text", "n_tokens", "top")] == ["alpha.mean@2", "alpha.max@2", "emotionality@2"]
    scored = _scored(model, out, "w1 al3 be2 al4")
    real = [i for i, p in enumerate(scored.positions) if p != 0]
    readout = Readout.load(out)
    layer2 = scored.scores[real][:, readout.layers.index(2), readout.concept_index("alpha")]
    assert one[0]["alpha.mean@2"] == pytest.approx(float(layer2.mean()), rel=1e-5, abs=1e-5)
    assert one[0]["alpha.mean@2"] != pytest.approx(full[0]["alpha.mean"], abs=1e-4)
    tokens = run("tokens.jsonl", "--tokens", "--clusters", Readout.load(out).concept_info("clusters")[0])
    assert "alpha" in tokens[0] and len(tokens) == sum(f["n_tokens"] for f in full)
    # Resuming a table with another selection is refused, and the table is left as it was.
    before = (tmp_path / "alpha.jsonl").read_bytes()
    for other in (["--concepts", "beta"], ["--concepts", "alpha", "--layers", "2"]):
        assert main([*base, "--out", str(tmp_path / "alpha.jsonl"), *other]) == 2
        err = capsys.readouterr().err
        assert "another table" in err and "selection" in err
    assert (tmp_path / "alpha.jsonl").read_bytes() == before
    assert main([*base, "--out", str(tmp_path / "x.jsonl"), "--summary"]) == 2
    assert "--summary" in capsys.readouterr().err
