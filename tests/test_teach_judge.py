"""distill's judges from outside the readout (no server): competence against a torch oracle, the
report's refusal to state a gap closed without it, the shipped texts and prompts, VADER's scope."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from helpers import tiny
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.teach import judge
from amygdala.teach.distill import DistillReport, ReportError


def oracle(model, ids: list[int]) -> tuple[float, int]:
    """Independently of judge.local_scorer: one forward pass per prefix, probabilities by exp/sum.
    Returns (sum of log-probs of tokens 2.., number of them that were the top-1 prediction)."""
    total, hits = 0.0, 0
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits = model(torch.tensor([ids[:i]])).logits[0, -1].double()
            p = torch.exp(logits - logits.max())
            total += math.log(float(p[ids[i]] / p.sum()))
            hits += int(logits[ids[i]] == logits.max())
    return total, hits


def test_competence_matches_a_torch_oracle_on_a_tiny_model():
    model, tok = tiny.make_model("llama")
    # Every third token the model's own top-1 in its exact context, the others arbitrary words: an accuracy
    # strictly inside (0, 1).
    ids_of: dict[str, list[int]] = {}  # token IDs given directly: a decode/encode round trip would not be the point
    for seed in range(4):
        ids = tok(tiny.COMMON[seed])["input_ids"]
        for i in range(12):
            if i % 3 == 2:
                with torch.no_grad():
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            else:
                ids.append(tok.convert_tokens_to_ids(tiny.COMMON[(7 * i + 13 * seed) % 120]))
        ids_of[f"text {seed}"] = ids
    texts, encode = list(ids_of), ids_of.__getitem__
    got = judge.competence(judge.local_scorer(model), encode, texts)
    sums = [oracle(model, encode(t)) for t in texts]
    n = sum(len(encode(t)) - 1 for t in texts)
    assert got.tokens == n and got.texts == 4
    assert got.mean_loglik == pytest.approx(sum(s for s, _ in sums) / n, abs=1e-5)
    assert got.accuracy == sum(h for _, h in sums) / n
    assert 0.3 <= got.accuracy < 0.6  # the model's own picks count, the arbitrary words mostly do not


def test_competence_refuses_texts_with_nothing_to_score():
    with pytest.raises(ValueError, match="no token to score"):
        judge.competence(lambda ids: [], lambda t: [1], ["x"])


def report(**kw) -> DistillReport:
    comp = judge.Competence(72, 1000, 0.4, -3.0)
    args = dict(train_prompts=55, heldout_prompts=18, pairs=50, identical=5, before={"joyful": 0.2},
                steered={"joyful": 1.2}, competence_before=comp, judges={"joyful": judge.outside_judge("joyful")},
                vader_before=0.1, vader_steered=0.3)
    return DistillReport(**{**args, **kw})


def test_the_report_refuses_a_gap_closed_without_the_competence_after_training():
    with pytest.raises(TypeError, match="competence_before"):
        DistillReport(55, 18, 50, 5, {"joyful": 0.2}, {"joyful": 1.2})  # type: ignore[call-arg]
    r = report(after={"joyful": 0.7})
    with pytest.raises(ReportError, match="no competence figure after training"):
        r.gap_closed("joyful")
    with pytest.raises(ReportError):
        r.table()
    r.competence_after = judge.Competence(72, 1000, 0.35, -3.2)
    assert r.gap_closed("joyful") == pytest.approx(0.5)
    table = r.table()
    assert "50%" in table and "accuracy 40.0%, log-lik -3.0000 nats/token -> accuracy 35.0%" in table
    assert "VADER compound should rise" in table
    assert "(not trained)" in report().table()  # before training: no gap, and nothing refused


def corpus_texts() -> list[str]:
    return [re.sub(r"\s+", " ", t.lower()) for t in (x.text for x in load_corpus(bundled_corpus()).texts)]


@pytest.mark.parametrize("rows,least,genres", [(judge.shipped_competence, 60, 6), (judge.shipped_prompts, 64, 7)])
def test_the_shipped_sets_sizes_genres_and_no_overlap_with_the_corpus(rows, least, genres):
    rows = rows()
    counts = Counter(g for g, _ in rows)
    assert len(rows) >= least and len(counts) >= genres and min(counts.values()) >= 8, counts
    texts = [t for _, t in rows]
    assert len(set(texts)) == len(texts)
    corpus = corpus_texts()
    for t in texts:
        t = re.sub(r"\s+", " ", t.lower())
        assert not any(t in c or c in t for c in corpus), t


def test_the_competence_texts_use_no_concept_name():
    names = {c.lower() for c in load_corpus(bundled_corpus()).concepts}
    for _, text in judge.shipped_competence():
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & names, (text, words & names)


def test_the_shipped_prompts_split_per_genre_deterministically():
    train, held = judge.shipped_split(0.25)
    assert (train, held) == judge.shipped_split(0.25)
    genre = dict((p, g) for g, p in judge.shipped_prompts())
    assert not set(train) & set(held) and sorted(train + held) == sorted(genre)
    assert {genre[p] for p in held} == set(genre.values())  # every genre is held out in part
    assert len(train) >= 48 and 0.2 < len(held) / len(genre) < 0.35


def test_vader_judges_valence_concepts_only():
    affect = load_corpus(bundled_corpus()).affect
    assert judge.outside_judge("joyful").sign == 1 and judge.outside_judge("angry").sign == -1
    neutral = next(c for c, a in affect.items() if a is not None and abs(a.valence) < judge.VALENCE_MIN)
    assert judge.outside_judge(neutral).sign == 0 and "near 0" in judge.outside_judge(neutral).why
    assert judge.outside_judge("no-such-concept").sign == 0
    assert "no valence" in judge.outside_judge("no-such-concept").why
    assert judge.vader_compound(["What a wonderful, happy day!"]) > 0.5 > -0.5 > judge.vader_compound(["This is awful and sad."])
    assert math.isnan(judge.vader_compound([]))
