"""The per-token eval (amygdala.validity.pertoken): its metrics on hand-computed cases, the
closed-form fold statistics against a direct computation, and a planted shared direction that
the old readout falls for and the new one does not."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from amygdala.activations import Activations
from amygdala.corpus.loader import BASELINE, STORY, Affect, Corpus, Text
from amygdala.validity.pertoken import (
    StoryTokens, Tally, auc, causal_smooth, content_tokens, per_token, table, top_share, valence_weights,
)


# --------------------------------------------------------------------------- metrics by hand
def test_auc_by_hand():
    assert auc([3, 1, 2], [True, False, True]) == 1.0
    # positives {2, 4}, negatives {1, 3}: 2>1, 4>1, 4>3 win, 2<3 loses -> 3/4
    assert auc([1, 2, 3, 4], [False, True, False, True]) == 0.75
    assert auc([1, 1], [True, False]) == 0.5  # a tie counts half
    assert auc([1, 2], [True, True]) is None


def test_top_share_and_smoothing_by_hand():
    assert top_share(Counter({0: 5, 1: 3, 2: 1, 3: 1})) == pytest.approx(9 / 10)
    assert top_share(Counter()) == 0.0
    z = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    assert causal_smooth(z, 2)[:, 0].tolist() == [1.0, 2.0, 4.0, 6.0]
    assert causal_smooth(z, 3)[:, 0].tolist() == [1.0, 2.0, 3.0, 5.0]
    assert torch.equal(causal_smooth(z, 1), z)


def test_valence_weights_are_the_pages_centred_ones():
    # known valences 0.5, -0.5, 0.3: mean 0.1 -> 0.4, -0.6, 0.2 and 0 for the unrated; sum |w| = 1.2
    w = valence_weights([0.5, -0.5, 0.3, None])
    assert w.tolist() == pytest.approx([0.4 / 1.2, -0.6 / 1.2, 0.2 / 1.2, 0.0])


def test_tally_by_hand():
    # Concepts 0, 2 in cluster X, 1 in Y; one story of concept 0 whose tokens' argmaxes are 0, 1, 2:
    # tokens in the right cluster 2 of 3; the story's mean z (2/3, 1, 2) picks 2, in X: a hit.
    t = Tally(["X", "Y", "X"], (1, 2))
    z = torch.tensor([[2.0, 0, 1], [0, 3, 0], [0, 0, 5]])
    t.add(0, z, colour=torch.tensor([1.0, -1.0, 3.0]), positive=True)
    t.add(1, torch.tensor([[0.0, 1, 0]]), colour=torch.tensor([-2.0]), positive=False)
    r = t.result(["a", "b", "c"])
    assert r["token_cluster_top1"] == pytest.approx(3 / 4)
    # smoothed over 2 tokens: story 0 rows (2,0,1), (1,1.5,.5), (0,1.5,2.5) -> 0, 1, 2 -> X, Y, X; story 1 right
    assert r["smoothed_token_cluster_top1"]["2"] == pytest.approx(3 / 4)
    assert r["story_cluster_top1"] == 1.0
    # per-token chance: 3 tokens of an X story (2/3) and 1 of a Y story (1/3)
    assert r["chance_token_cluster_top1"] == pytest.approx((3 * 2 / 3 + 1 / 3) / 4)
    assert r["top3_share"] == 1.0 and r["top3"][0] == "b"
    assert r["valence_auc"] == 1.0  # the positive story's mean colour 1 beats the negative's -2


def test_content_tokens_leave_out_the_attention_sink():
    m = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(content_tokens(m, 0), m[1:])
    assert torch.equal(content_tokens(m, 4), m)  # content after a prompt: position 0 is not in it
    assert torch.equal(content_tokens(m[:1], 0), m[:1])  # a one-token text keeps its one token


def test_fold_statistics_subtract_the_held_out_tokens_in_closed_form():
    # Story tokens projected on (1, 0): 1, 3 (story 0) and 5 (story 1). Without story 1: values 1, 3,
    # mean 2, population std 1.
    tokens = StoryTokens({0, 1}, set(), [0])
    tokens.add(0, 0, torch.tensor([[9.0, 9], [1, 7], [3, -2]]), 0)  # the first row is the sink, left out
    tokens.add(1, 0, torch.tensor([[5.0, 4]]), 3)
    assert tokens.story_moments[0].count == 3
    from amygdala.readout.construction import TokenMoments

    gone = TokenMoments(2).add(tokens.tokens[0][1].float())
    mean, std = tokens.story_moments[0].subtract(gone).mean_std(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert mean.tolist() == pytest.approx([2.0, 2.5]) and std.tolist() == pytest.approx([1.0, 4.5])


# --------------------------------------------------------------------------- planted directions
NEUTRAL_SHARED, NEUTRAL_OWN, NEUTRAL_F = 0.3, 2.0, 0.05


def planted_case(seed: int = 0):
    """Six concepts in three clusters (a/b in P, c/d in Q, e/f in R), hidden 16, one layer.

    Every story token carries a strong shared "emotional" direction (norm 4) that neutral text
    lacks, plus its concept's own direction (norm 1) and noise. Neutral text varies little along
    f's own direction, so every diffmean vector (which carries the shared direction) has its
    smallest neutral std at f: the old readout (as built, neutral statistics) calls most tokens f.
    Removing the concepts' mean takes the shared direction out and finds each token's concept.
    """
    g = torch.Generator().manual_seed(seed)
    hidden, n_stories, n_tok = 16, 6, 12
    concepts = list("abcdef")
    cluster = dict(zip(concepts, "PPQQRR"))
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))[0].T
    shared, own = basis[0], basis[1:7]
    texts, rows, kinds = [], [], []
    for i, c in enumerate(concepts):
        for k in range(n_stories):
            x = 4 * shared + own[i] + 0.4 * torch.randn(n_tok, hidden, generator=g)
            texts.append(f"{c} story {k}")
            rows.append(torch.cat([torch.full((1, hidden), 50.0), x]))  # row 0: the sink, wildly off
            kinds.append((STORY, c, f"place {k}"))
    # Neutral text: no shared direction; it varies a lot along the concepts' own directions except
    # f's (basis row 6), and little along the shared one.
    scale = torch.tensor([NEUTRAL_SHARED] + [NEUTRAL_OWN] * 5 + [NEUTRAL_F] + [1.0] * (hidden - 7))
    for k in range(20):
        texts.append(f"neutral {k}")
        rows.append(torch.cat([torch.full((1, hidden), 50.0), (torch.randn(n_tok, hidden, generator=g) * scale) @ basis]))
        kinds.append((BASELINE, None, "room"))
    corpus_texts = [Text(t, Path("stories") / f"{c or 'base'}.txt", i, kind, c, s)
                    for i, (t, (kind, c, s)) in enumerate(zip(texts, kinds))]
    valence = {"a": 0.8, "b": 0.6, "c": -0.7, "d": -0.5, "e": -0.6, "f": -0.8}
    corpus = Corpus(None, concepts, cluster, {}, {"P": "", "Q": "", "R": ""}, corpus_texts,
                    affect={c: Affect(v, 0.5, "test") for c, v in valence.items()})
    tokens = StoryTokens(set(range(len(concepts) * n_stories)), set(range(len(concepts) * n_stories, len(texts))), [0])
    for r, m in enumerate(rows):
        tokens.add(r, 0, m, 0)
    pooled = torch.stack([content_tokens(m, 0).half().float().mean(0) for m in rows])
    acts = Activations(texts=texts, layers=[0], pooled={0: pooled}, n_tokens=[n_tok] * len(texts))
    return corpus, acts, tokens


def test_planted_concepts_are_found_per_token_once_the_shared_direction_is_removed():
    corpus, acts, tokens = planted_case()
    pt = per_token(corpus, acts, tokens, "diffmean")
    assert pt["stories"] == 36 and pt["tokens"] == 36 * 12
    old, new = pt["variants"]["as_built/neutral"], pt["variants"]["mean_removed/emotional"]
    assert pt["chance"]["token_cluster_top1"] == pytest.approx(1 / 3)
    # The old readout ranks by neutral std: f takes most tokens, whatever the story.
    assert old["top3"][0] == "f" and old["token_cluster_top1"] < 0.5
    # The new one finds the planted concept's cluster on (nearly) every token and story.
    assert new["token_cluster_top1"] > 0.9 and new["story_cluster_top1"] == 1.0
    assert new["top3_share"] < old["top3_share"]
    # Valence: a, b are the pleasant stories; the fold-fitted direction separates them.
    assert pt["valence_direction"]["auc"] > 0.9
    assert "mean_removed/emotional" in table(pt)


def test_wilson_interval_by_hand():
    from amygdala.validity.steering import wilson

    # 8 of 10: centre (0.8 + 0.19208) / 1.38416 = 0.71677, half 1.96 * sqrt(0.016 + 0.0096040) / 1.38416 = 0.22661
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
