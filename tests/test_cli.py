"""The CLI end to end on a tiny model: planted-direction recovery, read, generate, bad input."""

import json

import pytest
import torch

from amygdala.cli.main import main
from amygdala.readout import Readout





def test_build_recovers_planted_direction(planted, tmp_path, caplog):
    model, corpus, d = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2",
                 "--method", "diffmean", "--out", str(out), "--quiet"]) == 0
    assert "target layers 1 (33%), 2 (67%)" in caplog.text
    r = Readout.load(out)
    assert r.concepts == ["alpha", "beta", "gamma"] and r.layers == [1, 2] and r.has_stats
    for l in r.layers:
        assert torch.dot(r.vectors[l][0], d) > 0.95
        torch.testing.assert_close(r.vectors[l].norm(dim=1), torch.ones(3))
    info = json.loads((out / "readout.json").read_text())
    weights = info["model"].pop("weights")  # the weights record: tests/test_readout_weights.py
    assert info["model"] == {"name": "model", "num_layers": 4} and info["corpus"]["sha256"]
    assert [f["name"] for f in weights["files"]] == ["model.safetensors"]
    # Per concept, what the live page shows: cluster, valence/arousal (None: the corpus gives none), description.
    for key in ("clusters", "valence", "arousal", "descriptions"):
        assert len(info[key]) == 3, key
    assert r.manifest()["descriptions"] == info["descriptions"]


def test_relative_layers_and_read_json(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "0.5", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["read", "--readout", str(out), "--model", str(model), "--json", "w1 w2 al3 al4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["zscore"] and [t["token"] for t in data["tokens"]] == ["w1", "w2", "al3", "al4"]
    assert data["tokens"][-1]["layers"]["2"][0][0] == "alpha"  # layer round(0.5 * 3) = 2


def test_generate_with_steering_changes_output(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "out"
    main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"])
    capsys.readouterr()
    base = ["generate", "--readout", str(out), "--model", str(model), "--raw", "--max-new-tokens", "8", "w1 w2"]
    main(base)
    plain = capsys.readouterr().out
    main(base + ["--steer", "alpha=0"])
    assert capsys.readouterr().out == plain
    main(base + ["--steer", "alpha=30", "--steer", "beta=-10", "--show-readout"])
    steered = capsys.readouterr().out
    assert steered.splitlines()[0] != plain.splitlines()[0]
    assert "L1:" in steered and "z-scores" in steered


def test_corpus_check_exit_codes(synthetic_corpus, tmp_path, capsys):
    assert main(["corpus", "check", str(synthetic_corpus)]) == 0
    (synthetic_corpus / "stories" / "omega.txt").write_text("# setting: x\nw1 w2 w3 w4 w5 w6\n")
    assert main(["corpus", "check", str(synthetic_corpus)]) == 1
    out = capsys.readouterr().out
    assert "omega.txt: no concept 'omega' in the manifest" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "9"], "layer 9 out of range; this model has layers 0-3"),
        (["--min-positives", "20"], "fewer than 20 positive texts"),
        (["--concepts", "alpah"], "not in the manifest; nearest: alpha"),
        (["--method", "nope"], "choose one of diffmean"),
        # the library names the parameter (layers, method_params); the CLI says the flag
        (["--layers", "9"], "error: --layers: layer 9 out of range"),
        (["--method", "nope"], "error: --method 'nope'; choose one of"),
        (["--method-param", "C=1"], "error: --method-param C: diffmean does not take it"),
        (["--pooling", "max"], "error: --pooling 'max': use one of last, mean"),
        (["--quality-report", "--redundant-r2", "2"], "error: --redundant-r2 2.0: must be in (0, 1]"),
    ],
)
def test_build_bad_input_fails_before_model_load(planted, tmp_path, capsys, args, message):
    model, corpus, _ = planted
    (model / "model.safetensors").unlink()  # loading would fail: validation must come first
    rc = main(["build", "--corpus", str(corpus), "--model", str(model), "--out", str(tmp_path / "o"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_library_errors_name_the_parameter_not_the_flag():
    """A Python caller passed ``layers=``, not ``--layers``: the message and ``param`` say so."""
    from amygdala import AmygdalaError
    from amygdala.methods import check_params
    from amygdala.models import parse_layers

    with pytest.raises(AmygdalaError, match="^layers: layer 9 out of range") as e:
        parse_layers("9", 4)
    assert e.value.param == "layers"
    with pytest.raises(AmygdalaError, match="^method_params C: diffmean does not take it") as e:
        check_params("diffmean", {"C": 1})
    assert e.value.param == "method_params"


def test_missing_corpus_is_one_line(tmp_path, capsys):
    assert main(["build", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "corpus folder does not exist" in capsys.readouterr().err


def test_unknown_steer_concept_lists_nearest(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "out"
    main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(out), "--quiet"])
    capsys.readouterr()
    assert main(["generate", "--readout", str(out), "--model", str(model), "--steer", "alhpa=3", "w1"]) == 2
    assert "unknown concept 'alhpa'; nearest: alpha" in capsys.readouterr().err
    assert main(["generate", "--readout", str(out), "--model", str(model), "--steer", "alpha=lots", "w1"]) == 2
    assert "is not a number" in capsys.readouterr().err


def test_readout_that_does_not_fit_model(planted, tmp_path, capsys):
    model, _, _ = planted
    Readout(["a"], [1], {1: torch.ones(1, 32)}).save(tmp_path / "r")
    assert main(["read", "--readout", str(tmp_path / "r"), "--model", str(model), "w1"]) == 2
    assert "readout hidden size 32 does not fit model (hidden size 64)" in capsys.readouterr().err
    Readout(["a"], [12], {12: torch.ones(1, 64)}).save(tmp_path / "r2")
    assert main(["read", "--readout", str(tmp_path / "r2"), "--model", str(model), "w1"]) == 2
    assert "layers [12] do not exist in model (4 layers" in capsys.readouterr().err


def test_interrupted_train_leaves_no_output(planted, tmp_path, monkeypatch):
    model, corpus, _ = planted
    import amygdala.readout.files as fmt

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "save_file", crash)
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 130
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o-*"))


def test_train_is_an_alias_of_build_with_a_note(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "old-name"
    assert main(["train", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "`amygdala train` is now `amygdala build`" in err
    assert (out / "readout.json").is_file() and (out / "readout.safetensors").is_file()


def test_python_dash_m_amygdala_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "amygdala", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("amygdala ")
