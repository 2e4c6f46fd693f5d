"""Your own pairs: Corpus.from_pairs / from_texts, ``build --pairs FILE.jsonl``, every method on
one concept's pairs, and parity with repeng 0.4's ControlVector.train."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from helpers import tiny
from amygdala import AmygdalaError
from amygdala.cli.main import main
from amygdala.corpus import Corpus, CorpusError, read_pairs_jsonl
from amygdala.methods import METHODS
from amygdala.pipeline import BuildConfig, build
from amygdala.readout import Readout


def honest_pairs(n: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs that differ only in the concept words: the positive says alpha's words where the
    negative says beta's, in the same filler (repeng's persona-swap datasets have this shape).
    How many words differ varies from pair to pair (1 to 4 and the last), so the difference also
    varies along the concept: repeng's centred PCA sees only that variation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(tiny.COMMON[:120]) for _ in range(8)]
        slots = rng.sample(range(8), rng.randint(1, 4))
        pos, neg = list(words), list(words)
        for i in slots:
            pos[i], neg[i] = rng.choice(tiny.CONCEPT_WORDS["alpha"]), rng.choice(tiny.CONCEPT_WORDS["beta"])
        pos.append(rng.choice(tiny.CONCEPT_WORDS["alpha"]))
        neg.append(rng.choice(tiny.CONCEPT_WORDS["beta"]))
        out.append((" ".join(pos), " ".join(neg)))
    return out


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """A tiny Llama whose embeddings of alpha's words carry a known direction."""
    model, tok = tiny.make_model("llama", hidden=64, layers=4)
    d = tiny.random_unit(64, 7)
    tiny.plant(model, tok, tiny.CONCEPT_WORDS["alpha"], d, scale=1.0)
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, d


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------ the corpus
def test_from_pairs_negatives_are_the_concepts_own_pairs_only():
    pairs = {"honest": honest_pairs(4), "calm": [("p one", "n one"), ("p two", "n two")]}
    c = Corpus.from_pairs(pairs)
    assert c.concepts == ["honest", "calm"]
    assert [t.text for t in c.positives("calm")] == ["p one", "p two"]
    assert [t.text for t in c.negatives("calm")] == ["n one", "n two"]  # not honest's texts
    assert [t.text for t in c.negatives("honest")] == [n for _, n in pairs["honest"]]
    assert c.neutral_texts() == []  # a pair's negative is the opposite feeling, not neutral text
    assert c.subset(["calm"]).text_list() == ["p one", "n one", "p two", "n two"]
    swapped = Corpus.from_pairs({"honest": [(n, p) for p, n in pairs["honest"]]})
    assert Corpus.from_pairs({"honest": pairs["honest"]}).sha256() != swapped.sha256()


def test_from_texts_negatives_are_other_concepts_and_neutral():
    c = Corpus.from_texts({"calm": ["c1", "c2"], "angry": ["a1"]}, neutral=["n1", "n2"])
    assert sorted(t.text for t in c.negatives("calm")) == ["a1", "n1", "n2"]
    assert [t.text for t in c.neutral_texts()] == ["n1", "n2"]
    with pytest.raises(CorpusError, match="no negatives; pass neutral"):
        Corpus.from_texts({"calm": ["c1"]})


@pytest.mark.parametrize("bad, match", [
    ({"Honest": [("a", "b")]}, "not lower_snake_case"),
    ({"honest": []}, "has no pairs"),
    ({"honest": [("a",)]}, r"<pairs:honest>:1: a pair is \(positive, negative\)"),
    ({"honest": [("a", "b"), ("c", "")]}, "<pairs:honest>:2: negative: expected a non-empty string"),
    ({"honest": [("same", "same")]}, "are the same text"),
])
def test_from_pairs_refuses_bad_input_naming_it(bad, match):
    with pytest.raises(CorpusError, match=match):
        Corpus.from_pairs(bad)


def test_jsonl_default_concept_is_the_file_stem_and_concept_field_splits(tmp_path):
    f = tmp_path / "Honest-Pairs.jsonl"
    write_jsonl(f, [{"positive": "a", "negative": "b", "source": "ignored"}, {"positive": "c", "negative": "d"},
                    {"positive": "e", "negative": "f", "concept": "calm"}])
    c = read_pairs_jsonl(f)
    assert c.concepts == ["honest_pairs", "calm"]
    assert c.pairs == {"honest_pairs": [("a", "b"), ("c", "d")], "calm": [("e", "f")]}
    assert c.positives("calm")[0].where() == f"{f}:3"


@pytest.mark.parametrize("line, match", [
    ('{"positive": "a"', r"x.jsonl:2: not JSON"),
    ('["a", "b"]', r"x.jsonl:2: expected an object"),
    ('{"positive": "a"}', r"x.jsonl:2: field 'negative' missing"),
    ('{"positive": "a", "negative": 3}', r"x.jsonl:2: field 'negative': expected a non-empty string, got int"),
    ('{"positive": " ", "negative": "b"}', r"x.jsonl:2: field 'positive': expected a non-empty string"),
    ('{"positive": "a", "negative": "b", "concept": "Not OK"}', r"x.jsonl:2: field 'concept': concept name 'Not OK'"),
])
def test_bad_jsonl_lines_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "x.jsonl"
    f.write_text('{"positive": "ok", "negative": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=match) as e:
        read_pairs_jsonl(f)
    assert "\n" not in str(e.value)


def test_jsonl_whose_stem_is_no_concept_name_asks_for_the_field(tmp_path):
    f = tmp_path / "2024.jsonl"
    write_jsonl(f, [{"positive": "a", "negative": "b"}])
    with pytest.raises(CorpusError, match=r"2024.jsonl:1: the file name gives no usable concept name"):
        read_pairs_jsonl(f)


# ------------------------------------------------------------------ every method on one concept's pairs
#: Methods whose vector should find the planted direction from 12 pairs (linear's minimum-norm
#: fit and the sparse logistic_l1 keep a few coordinates only; subspace mixes in token subspaces).
FINDS_PLANTED = {"diffmean", "mean", "pca", "pca_diff", "logistic"}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "denoised"])
def test_every_method_builds_one_concept_from_pairs_toward_the_positives(method, planted_model, tmp_path):
    path, d = planted_model
    pairs = honest_pairs(12)
    corpus = Corpus.from_pairs({"honest": pairs})
    out = tmp_path / "r"
    params = {"C": 100} if method == "logistic_l1" else {}  # C=1 zeroes every weight on 12 pairs
    result = build(corpus, BuildConfig(model=str(path), layers="1,2", method=method, method_params=params,
                                       progress=False), out)
    r = Readout.load(out)
    assert r.concepts == ["honest"] and (out / "readout.safetensors").is_file() and (out / "readout.json").is_file()
    assert r.meta["method"] == method
    acts = result.activations
    for layer in (1, 2):
        v = r.vectors[layer][0]
        assert abs(float(v.norm()) - 1) < 1e-4
        proj = acts.pooled[layer] @ v
        pos, neg = proj[acts.rows([p for p, _ in pairs])], proj[acts.rows([n for _, n in pairs])]
        assert float((pos - neg).mean()) > 0, (layer, method)  # signed toward the positives
    if method in FINDS_PLANTED:  # the planted direction enters the residual at alpha's words
        assert float(r.vectors[1][0] @ d) > 0.9, float(r.vectors[1][0] @ d)


def test_denoised_on_one_concept_fails_before_the_model_loads(tmp_path):
    corpus = Corpus.from_pairs({"honest": honest_pairs(4)})
    with pytest.raises(AmygdalaError, match="--method denoised needs at least 2 concepts"):
        build(corpus, BuildConfig(model=str(tmp_path / "no-model-here"), method="denoised"))
    two = Corpus.from_pairs({"honest": honest_pairs(4), "calm": honest_pairs(4, seed=1)})
    with pytest.raises(AmygdalaError, match="--method denoised needs at least 2 neutral texts"):
        build(two, BuildConfig(model=str(tmp_path / "no-model-here"), method="denoised"))


def test_denoised_works_with_two_pair_concepts_and_neutral_texts(planted_model, tmp_path):
    path, _ = planted_model
    rng = random.Random(3)
    neutral = [tiny.sentence(rng, None) for _ in range(6)]
    corpus = Corpus.from_pairs({"honest": honest_pairs(6), "calm": honest_pairs(6, seed=1)[::-1]}, neutral=neutral)
    r = build(corpus, BuildConfig(model=str(path), layers="1", method="denoised", progress=False)).readout
    assert torch.isfinite(r.vectors[1]).all() and r.vectors[1].norm(dim=1).min() > 0.5


def test_cli_build_pairs_writes_the_readout_and_refuses_bad_input(planted_model, tmp_path, capsys):
    path, _ = planted_model
    f = tmp_path / "honest.jsonl"
    write_jsonl(f, [{"positive": p, "negative": n} for p, n in honest_pairs(8)])
    out = tmp_path / "out"
    assert main(["build", "--pairs", str(f), "--model", str(path), "--layers", "1,2", "--method", "pca_diff",
                 "--out", str(out), "--quiet"]) == 0
    r = Readout.load(out)
    assert r.concepts == ["honest"] and r.meta["corpus"]["path"] == str(f)
    capsys.readouterr()
    assert main(["build", "--pairs", str(f), "--model", str(path), "--method", "denoised", "--out", str(out)]) == 2
    assert "needs at least 2 concepts" in capsys.readouterr().err
    f.write_text(f.read_text() + '{"positive": "x"}\n')
    assert main(["build", "--pairs", str(f), "--model", str(path), "--out", str(out)]) == 2
    assert f"{f}:9: field 'negative' missing" in capsys.readouterr().err
    assert main(["build", "--pairs", str(f), "--corpus", str(tmp_path), "--out", str(out)]) == 2


# ------------------------------------------------------------------ parity with repeng 0.4
def repeng_train(model, tokenizer, dataset: list[tuple[str, str]], hidden_layers: list[int]) -> dict[int, np.ndarray]:
    """repeng 0.4.0's ``ControlVector.train`` (``read_representations``, method ``pca_diff``),
    line for line from its source, so the parity oracle is its algorithm and not ours.

    repeng itself cannot be installed here: it requires numpy<2 and the pinned numpy is 2.x.
    The hidden state of each text at its last non-padding token (``hidden_states[layer + 1]``,
    the output of decoder block ``layer`` except at the last layer), texts ordered positive, negative, ...; per layer
    scikit-learn ``PCA(n_components=1)`` of ``h[::2] - h[1::2]``; flipped when more pairs have
    the positive projecting below its negative than above.
    """
    from sklearn.decomposition import PCA

    train_strs = [s for pos, neg in dataset for s in (pos, neg)]
    hidden = {layer: [] for layer in hidden_layers}
    with torch.no_grad():
        for p in range(0, len(train_strs), 32):
            batch = train_strs[p : p + 32]
            enc = tokenizer(batch, padding=True, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            for i in range(len(batch)):
                last = enc["attention_mask"][i].nonzero(as_tuple=True)[0][-1].item()
                for layer in hidden_layers:
                    hidden[layer].append(out.hidden_states[layer + 1][i][last].cpu().float().numpy())
    directions = {}
    for layer in hidden_layers:
        h = np.vstack(hidden[layer])
        train = h[::2] - h[1::2]
        direction = PCA(n_components=1, whiten=False).fit(train).components_.astype(np.float32).squeeze(axis=0)
        projected = (h @ direction) / np.linalg.norm(direction)
        smaller = np.mean([projected[i] < projected[i + 1] for i in range(0, len(h), 2)])
        larger = np.mean([projected[i] > projected[i + 1] for i in range(0, len(h), 2)])
        directions[layer] = -direction if smaller > larger else direction
    return directions


def test_pca_diff_matches_repeng_control_vector_train(planted_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = planted_model
    pairs = honest_pairs(24, seed=5)
    pairs[3] = (pairs[3][0], pairs[1][1])  # a negative used twice: pairing must stay as given
    # Not the last layer: there transformers' hidden_states[-1] is after the final norm, which
    # repeng reads and a readout (the decoder block's own output) does not.
    layers = [0, 1, 2]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = repeng_train(model, tokenizer, pairs, layers)
    ours = build(Corpus.from_pairs({"honest": pairs}), BuildConfig(
        model=str(path), layers=",".join(map(str, layers)), method="pca_diff", pooling="last",
        construction="as_built", progress=False)).readout
    for layer in layers:
        e = torch.from_numpy(expected[layer]).double()
        v = ours.vectors[layer][0].double()
        cos = float(v @ e / (v.norm() * e.norm()))
        assert cos > 0.99, (layer, cos)  # same direction and the same sign
    # ...and the uncentred pca (steering-vectors') is a different method, so the check can fail.
    other = build(Corpus.from_pairs({"honest": pairs}), BuildConfig(
        model=str(path), layers="1", method="pca", pooling="last", construction="as_built", progress=False)).readout
    e = torch.from_numpy(expected[1]).double()
    assert abs(float(other.vectors[1][0].double() @ e / e.norm())) < 0.99


def test_pca_diff_on_a_corpus_folder_fails_before_the_model_loads(synthetic_corpus, tmp_path):
    from amygdala.corpus import load_corpus

    with pytest.raises(AmygdalaError, match="--method pca_diff needs contrastive pairs for every concept"):
        build(load_corpus(synthetic_corpus), BuildConfig(model=str(tmp_path / "no-model-here"), method="pca_diff"))
