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
