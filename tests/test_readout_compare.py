"""amygdala diff (readout/compare.py): a readout against itself is cosine 1 everywhere; against a
planted rotation of itself, the cosine computed independently; layers matched or refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from amygdala.cli.main import main
from amygdala.readout import Readout, ReadoutError
from amygdala.readout.compare import compare


def _readout(concepts=("a", "b", "c"), layers=(1, 2), num_layers=4, seed=0) -> Readout:
    g = torch.Generator().manual_seed(seed)
    vec = {l: torch.nn.functional.normalize(torch.randn(len(concepts), 8, generator=g), dim=1) for l in layers}
    return Readout(concepts=list(concepts), layers=list(layers), vectors=vec, meta={"model": {"num_layers": num_layers}})


def test_diff_with_itself_is_one_everywhere(tmp_path, capsys):
    folder = _readout().save(tmp_path / "r")
    assert main(["diff", str(folder), str(folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers"] == [[1, 1], [2, 2]] and d["only_a"] == d["only_b"] == []
    assert all(x == pytest.approx(1.0, abs=1e-6) for v in d["cosine"].values() for x in v)
    assert main(["diff", str(folder), str(folder)]) == 0
    assert "1~1" in capsys.readouterr().out


def test_diff_with_a_planted_rotation_equals_the_independent_cosine(tmp_path):
    a = _readout()
    theta = 0.7
    rot = np.eye(8)
    rot[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    b = _readout(concepts=("b", "a", "d"))  # other order, one concept each side alone
    for l in a.layers:
        b.vectors[l][0] = torch.tensor(a.vectors[l][1].numpy() @ rot.T, dtype=torch.float32)
        b.vectors[l][1] = torch.tensor(a.vectors[l][0].numpy() @ rot.T, dtype=torch.float32)
    d = compare(a, b)
    assert d["only_a"] == ["c"] and d["only_b"] == ["d"]
    for name, row in (("a", 0), ("b", 1)):
        for k, l in enumerate(a.layers):
            v = a.vectors[l][row].double().numpy()
            w = v @ rot.T
            assert d["cosine"][name][k] == pytest.approx(float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)), abs=1e-5)


def test_layers_matched_by_depth_or_refused(tmp_path, capsys):
    a, b = _readout(layers=(1, 2), num_layers=4), _readout(layers=(3, 5), num_layers=8)
    assert compare(a, b)["layers"] == [[1, 3], [2, 5]]  # 1/3 ~ 3/7 (2/7 is further), 2/3 ~ 5/7
    b.meta = {}
    with pytest.raises(ReadoutError, match=r"layers \[1, 2\] and \[3, 5\]"):
        compare(a, b)
    assert main(["diff", str(tmp_path / "missing"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing" in err
