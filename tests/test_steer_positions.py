"""Steering placed at positions (issue 26): "generated", "prompt" and from_token on transformers.

The oracle: steering only layer 1 while teacher-forcing fixed tokens leaves every layer-1 block
input as it was (the delta is added after the block, so no layer-1 KV changes), so the layer-1
readout of a steered position differs from the unsteered one by exactly delta @ vectors.T, and
a position that is not steered does not differ at all.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from amygdala.cli.main import main
from amygdala.readout import Readout, ReadoutError, Steering, attach
from helpers import tiny

PROMPT, TOTAL = 6, 11


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny.make_model("llama", hidden=64, layers=4)
    model.eval()
    g = torch.Generator().manual_seed(3)
    vecs = {l: torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1) for l in (1, 2)}
    readout = Readout(["a", "b", "c"], [1, 2], vecs)
    ids = torch.randint(10, 100, (1, TOTAL), generator=g)
    return model, tok, readout, ids


def forced(model, readout, ids, steering) -> torch.Tensor:
    """Scores [positions, layers, concepts] of a prefill of PROMPT tokens then the rest on its KV cache."""
    with torch.inference_mode(), attach(model, readout, steering=steering) as s:
        cache = DynamicCache()
        model(ids[:, :PROMPT], past_key_values=cache, use_cache=True)
        model(ids[:, PROMPT:], past_key_values=cache, use_cache=True)
    return s.scores()[0]


def steered_rows(model, readout, ids, steering) -> torch.Tensor:
    """Which positions' layer-1 readout moved by exactly the delta (True), or not at all (False)."""
    base, got = forced(model, readout, ids, None), forced(model, readout, ids, steering)
    added = (steering.deltas[1] @ readout.vectors[1].T).float()
    diff = got[:, 0] - base[:, 0]
    rows = []
    for p in range(TOTAL):
        if torch.allclose(diff[p], torch.zeros_like(diff[p]), atol=0, rtol=0):
            rows.append(False)
        else:
            torch.testing.assert_close(diff[p], added, atol=1e-4, rtol=1e-4)
            rows.append(True)
    return torch.tensor(rows)


def _steer(readout, **place) -> Steering:
    return Steering.from_concepts(readout, {"a": 5.0}, layers=[1]).placed(**place)


def test_all_positions_stay_the_default(setup):
    model, _, readout, ids = setup
    assert steered_rows(model, readout, ids, _steer(readout)).all()


def test_generated_only_leaves_the_prompt_unsteered_and_steers_every_generated_position(setup):
    model, _, readout, ids = setup
    rows = steered_rows(model, readout, ids, _steer(readout, positions="generated"))
    assert rows.tolist() == [False] * PROMPT + [True] * (TOTAL - PROMPT)
    # ... and the whole prompt readout, every layer, is the unsteered one
    base, got = forced(model, readout, ids, None), forced(model, readout, ids, _steer(readout, positions="generated"))
    assert torch.equal(got[:PROMPT], base[:PROMPT])


def test_prompt_only_steers_the_prompt_and_adds_nothing_after_it(setup):
    model, _, readout, ids = setup
    rows = steered_rows(model, readout, ids, _steer(readout, positions="prompt"))
    assert rows.tolist() == [True] * PROMPT + [False] * (TOTAL - PROMPT)


@pytest.mark.parametrize("start", [0, 3, PROMPT, 8])
def test_from_token_boundary_is_exact(setup, start):
    model, _, readout, ids = setup
    rows = steered_rows(model, readout, ids, _steer(readout, from_token=start))
    assert rows.tolist() == [p >= start for p in range(TOTAL)]


def test_placements_combine(setup):
    model, _, readout, ids = setup
    rows = steered_rows(model, readout, ids, _steer(readout, positions="prompt", from_token=2))
    assert rows.tolist() == [2 <= p < PROMPT for p in range(TOTAL)]


def test_generate_with_generated_only_samples_the_first_token_unsteered(setup):
    """In generate() (cache_position path): the forward that samples the first new token is the
    unsteered prefill, so the first token and the prompt's readout match the unsteered run, and
    "generated" is the same as from_token=len(prompt)."""
    model, _, readout, ids = setup
    prompt = ids[:, :PROMPT]
    strong = Steering.from_concepts(readout, {"a": 40.0, "b": -40.0})

    def gen(steering):
        with torch.inference_mode(), attach(model, readout, steering=steering) as s:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        return out[0, PROMPT:], s.scores()[0]

    base_tokens, base = gen(None)
    tokens, scores = gen(strong.placed("generated"))
    assert tokens[0] == base_tokens[0]
    assert torch.equal(scores[:PROMPT], base[:PROMPT])
    assert not torch.allclose(scores[PROMPT:], base[PROMPT: scores.shape[0]])
    from_tokens, from_scores = gen(strong.placed(from_token=PROMPT))
    assert torch.equal(from_tokens, tokens) and torch.equal(from_scores, scores)


def test_a_list_of_differently_placed_terms_adds_each_where_it_is_placed(setup):
    model, _, readout, ids = setup
    a = _steer(readout, positions="prompt")
    b = _steer(readout, positions="generated")
    both = forced(model, readout, ids, [a, b])
    assert torch.allclose(both, forced(model, readout, ids, _steer(readout)), atol=1e-5)
    with pytest.raises(ReadoutError, match="different positions"):
        a + b


@pytest.mark.parametrize("place, param", [(dict(positions="foo"), "positions"), (dict(from_token=-1), "from_token"),
                                          (dict(from_token=True), "from_token"), (dict(from_token=1.5), "from_token"),
                                          (dict(from_token=10**400), "from_token")])
def test_bad_placement_is_refused_naming_it(setup, place, param):
    _, _, readout, _ = setup
    with pytest.raises(ReadoutError, match=f"^{param}:"):
        _steer(readout, **place)


@pytest.mark.parametrize("flags, says", [(["--steer-positions", "foo"], "--steer-positions"),
                                         (["--steer-from", "-1"], "--steer-from")])
def test_cli_bad_placement_exits_2_naming_the_flag(tmp_path, capsys, flags, says):
    code = main(["generate", "hi", "--readout", str(tmp_path / "none"), "--steer", "a=1", *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_cli_generate_places_the_steering(planted, tmp_path, capsys):
    """``generate --steer-positions generated``: the first new token is sampled unsteered (its
    readout row is the plain run's); it is ``--steer-from 3`` (BOS + 2 prompt words), and
    ``--steer-from 0`` is the unplaced ``--steer``."""
    model, corpus, _ = planted
    out = tmp_path / "out"
    main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"])
    capsys.readouterr()
    base = ["generate", "--readout", str(out), "--model", str(model), "--raw", "--max-new-tokens", "8", "--show-readout",
            "w1 w2"]

    def run(*flags) -> list[str]:
        assert main(base + list(flags)) == 0
        return capsys.readouterr().out.splitlines()  # the text, then one readout row per new token

    plain = run()
    steer = ["--steer", "alpha=30", "--steer", "beta=-10"]
    everywhere, generated = run(*steer), run(*steer, "--steer-positions", "generated")
    assert everywhere[:2] != plain[:2]
    assert generated[1] == plain[1]
    assert run(*steer, "--steer-from", "3") == generated
    assert run(*steer, "--steer-from", "0") == everywhere
