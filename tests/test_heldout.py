"""Leave-one-story-out evaluation on planted concepts."""

import torch

from helpers import tiny
from amygdala.activations import collect
from amygdala.corpus import load_corpus
from amygdala.validity.heldout import folds, leave_one_story_out


def test_folds_hold_each_scene_text_out_once(synthetic_corpus):
    corpus = load_corpus(synthetic_corpus)
    fs = folds(corpus)
    assert len(fs) == 8 and all(set(f) == {"alpha", "beta", "gamma"} for f in fs)
    held = [t for f in fs for t in f.values()]
    assert len(held) == len(set(held)) == 24


def test_planted_concepts_are_recognised_and_random_ones_are_not(tmp_path):
    corpus = load_corpus(tiny.write_corpus(tmp_path / "c", concepts=("alpha", "beta", "gamma", "delta")))
    model, tok = tiny.make_model("llama")
    for i, c in enumerate(("alpha", "beta")):  # gamma and delta stay unplanted
        tiny.plant(model, tok, tiny.CONCEPT_WORDS[c], tiny.random_unit(64, i), scale=1.5)
    acts = collect(model, tok, corpus.text_list(), [1, 2], progress=False)
    result = leave_one_story_out(corpus, acts)
    assert result.n == 32
    assert all(r == 0 for c in ("alpha", "beta") for r in result.ranks[c])
    assert result.top1 >= 0.5 and result.top5 == 1.0
    assert "top-1" in result.summary()
