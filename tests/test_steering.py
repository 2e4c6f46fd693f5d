"""Readout and steering on a transformers model through attach(), generate() and its KV cache."""

import pytest
import torch

from helpers import tiny
from amygdala.readout import Readout, ReadoutError, Steering, attach


@pytest.fixture()
def model_and_readout():
    model, tok = tiny.make_model("llama", hidden=64, layers=4)
    g = torch.Generator().manual_seed(1)
    vecs = {l: torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=1) for l in (1, 2)}
    readout = Readout(["calm", "angry", "joy"], [1, 2], vecs)
    return model, tok, readout


def greedy(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)


def test_steering_changes_greedy_output_and_zero_is_identity(model_and_readout):
    model, tok, readout = model_and_readout
    ids = tok("w1 w2 w3 al1", return_tensors="pt")["input_ids"]
    plain = greedy(model, ids)
    with attach(model, readout, steering=Steering.from_concepts(readout, {"calm": 0.0})):
        zero = greedy(model, ids)
    with attach(model, readout, steering=Steering.from_concepts(readout, {"calm": 8.0, "angry": -4.0})):
        steered = greedy(model, ids)
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, steered)
    assert torch.equal(greedy(model, ids), plain)  # hooks are gone after the block


def test_readout_during_generate_matches_full_forward(model_and_readout):
    """With the KV cache, per-step scores equal the scores of one forward over the whole sequence."""
    model, tok, readout = model_and_readout
    ids = tok("w1 w2 w3 al1", return_tensors="pt")["input_ids"]
    with torch.no_grad(), attach(model, readout) as s:
        out = greedy(model, ids)
    stepwise = s.scores()
    with torch.no_grad(), attach(model, readout) as s2:
        model(out[:, :-1])
    full = s2.scores()
    assert stepwise.shape == full.shape == (1, out.shape[1] - 1, 2, 3)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-4)


def test_readout_scores_are_projections_of_block_output(model_and_readout):
    model, tok, readout = model_and_readout
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    with torch.no_grad(), attach(model, readout) as s:
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(s.scores()[0, :, 0], hs[2][0] @ readout.vectors[1].T)


def test_steering_values_compose():
    v = torch.tensor([1.0, 0.0])
    a = Steering.from_vector(v, 2.0, [1])
    b = Steering.from_vector(torch.tensor([0.0, 3.0]), 1.0, [1, 2])
    c = 2 * (a + b)
    torch.testing.assert_close(c.deltas[1], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(c.deltas[2], torch.tensor([0.0, 2.0]))


def test_bad_steering_input(model_and_readout):
    _, _, readout = model_and_readout
    with pytest.raises(ReadoutError, match="nearest: calm"):
        Steering.from_concepts(readout, {"clam": 1.0})
    with pytest.raises(ReadoutError, match="must be a number"):
        Steering.from_concepts(readout, {"calm": "lots"})
    with pytest.raises(ReadoutError, match="not in the readout"):
        Steering.from_concepts(readout, {"calm": 1.0}, layers=[3])


def test_attach_rejects_readout_of_another_model(model_and_readout):
    model, _, _ = model_and_readout
    other = Readout(["a"], [1], {1: torch.ones(1, 32)})
    with pytest.raises(ReadoutError, match="hidden size 32"):
        with attach(model, other):
            pass
