"""Validity: held-out accuracy against a hand-computed case, the geometry figures, pooling and the
denoised method on planted directions, steering judged by the real VADER, and `amygdala eval`."""

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny
from amygdala.activations import Activations, collect
from amygdala.cli.main import main
from amygdala.corpus import load_corpus
from amygdala.corpus.loader import BASELINE, STORY, Corpus, Text
from amygdala.methods import concept_sets, fit
from amygdala.validity.geometry import auc, geometry, pearson
from amygdala.validity.heldout import held_out
from amygdala.validity.pertoken import VARIANTS
from amygdala.validity.steering import SteeringConfig, steering_efficacy
from amygdala.readout import Readout


# --------------------------------------------------------------------------- held-out, by hand
def hand_case() -> tuple[Corpus, Activations]:
    """Concepts a, c (cluster X) and b (cluster Y); rows in 2-D, the same at layers 0 and 1.

    a's stories sit at (3, 0) except a3, which sits near b's, at (0.5, 3); c's at (-3, 0); one
    baseline at the origin. Worked out by hand (diffmean, z-scored by the fold's training rows):
    every held-out text is recognised except a3, which scores z 1.47 on b, -0.05 on a and -0.45
    on c (rank 1). So 7 of 8 right,
    top-5 is 100% with 3 concepts, and cluster top-1 is 7/8 too (b is in another cluster).
    Cluster chance: the mean over held-out texts of (concepts in its true cluster) / 3
    = (3 * 2/3 + 3 * 1/3 + 2 * 2/3) / 8 = 13/24.
    """
    rows = {"a1": (3, 0), "a2": (3, 0), "a3": (0.5, 3), "b1": (0, 3), "b2": (0, 3), "b3": (0, 3),
            "c1": (-3, 0), "c2": (-3, 0), "n1": (0, 0)}
    # Identical rows would be one text: a tiny offset keeps them distinct without changing the argmaxes.
    texts = [f"{name} text" for name in rows]
    pooled = torch.tensor([[x + 1e-3 * i, y] for i, (x, y) in enumerate(rows.values())], dtype=torch.float32)
    path = Path("stories")
    corpus_texts = [
        Text(f"{name} text", path / f"{name[0]}.txt", i, STORY, name[0], f"place {name[1]}")
        for i, name in enumerate(rows) if name[0] != "n"
    ] + [Text("n1 text", Path("paired/room/baseline.txt"), 1, BASELINE, None, "room")]
    corpus = Corpus(None, ["a", "b", "c"], {"a": "X", "b": "Y", "c": "X"}, {}, {"X": "", "Y": ""}, corpus_texts)
    acts = Activations(texts=texts, layers=[0, 1], pooled={0: pooled, 1: pooled.clone()}, n_tokens=[5] * len(texts))
    return corpus, acts


def test_held_out_matches_the_hand_computed_case():
    corpus, acts = hand_case()
    results = held_out(corpus, acts, "diffmean")
    assert set(results) == {0, 1, "all"}
    for r in results.values():
        assert r.n == 8
        assert r.top1 == pytest.approx(7 / 8) and r.top5 == 1.0 and r.cluster_top1 == pytest.approx(7 / 8)
        assert r.chance_top1 == pytest.approx(1 / 3) and r.chance_top5 == 1.0
        assert r.chance_cluster_top1 == pytest.approx(13 / 24)
        assert r.confused == [("a", "b", 1)]
        assert r.ranks["a"] == [0, 0, 1] and r.ranks["b"] == [0, 0, 0] and r.ranks["c"] == [0, 0]
    j = results["all"].to_json()
    assert j["concept_top1"] == pytest.approx(0.875) and j["chance"]["cluster_top1"] == pytest.approx(13 / 24)


# --------------------------------------------------------------------------- geometry
def test_pearson_and_auc_small_cases():
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.25)  # one tie (half), one loss


def test_geometry_finds_planted_valence_and_arousal_axes():
    g = torch.Generator().manual_seed(0)
    n, hidden = 40, 32
    valence = torch.linspace(-1, 1, n)[torch.randperm(n, generator=g)]
    arousal = torch.rand(n, generator=g)
    e = torch.linalg.qr(torch.randn(hidden, hidden, generator=g)).Q
    # Valence spans the widest axis, arousal the second: PC1 and PC2 of the vectors. A shared
    # component (as every concept vector has) keeps the norms alike, so normalising the rows does
    # not bend the axes.
    vectors = (20 * e[2] + 3 * valence[:, None] * e[0] - 1.5 * (arousal[:, None] - 0.5) * e[1]
               + 0.05 * torch.randn(n, hidden, generator=g))
    polarity = ["positive" if v > 0.2 else "negative" if v < -0.2 else None for v in valence.tolist()]
    got = geometry(vectors, valence.tolist(), arousal.tolist(), polarity)
    assert got["pc1_valence_r"] > 0.98 and got["pc2_arousal_r"] > 0.95
    assert got["pc1_polarity_auc"] == 1.0 and got["n_rated"] == n
    assert got["decodable_valence_r"] > 0.95 and got["decodable_arousal_r"] > 0.9
    xs = torch.tensor([p[0] for p in got["map"]])
    assert pearson(xs, valence) > 0.98  # the map is oriented: right is pleasant
    shuffled = geometry(torch.randn(n, hidden, generator=g), valence.tolist(), arousal.tolist(), polarity)
    assert shuffled["pc1_valence_r"] < 0.5 and shuffled["decodable_valence_r"] < 0.5


# --------------------------------------------------------------------------- pooling, planted
def _write(root: Path, alpha: list[str], beta: list[str]) -> Corpus:
    (root / "stories").mkdir(parents=True)
    (root / "manifest.toml").write_text('[lint]\nmin_words = 5\n\n[clusters.g]\ndescription = "x"\n\n'
                                        '[concepts.alpha]\ncluster = "g"\n\n[concepts.beta]\ncluster = "g"\n')
    for name, texts in (("alpha", alpha), ("beta", beta)):
        (root / "stories" / f"{name}.txt").write_text("\n\n".join(f"# setting: s{i}\n{t}" for i, t in enumerate(texts)))
    return load_corpus(root)


def _cos(model, tok, corpus, pooling, d) -> float:
    acts = collect(model, tok, corpus.text_list(), [1], pooling=pooling, progress=False)
    v = fit("diffmean", acts, concept_sets(corpus, acts)).vectors[1][0]
    return float(v @ d)


def test_mean_pooling_finds_a_concept_carried_mid_text_and_last_does_not(tmp_path):
    import random

    rng = random.Random(0)
    model, tok = tiny.make_model("llama")
    d = tiny.random_unit(64, 3)
    tiny.plant(model, tok, tiny.CONCEPT_WORDS["alpha"], d, scale=1.0)
    filler = tiny.COMMON[:100]

    def text(middle: list[str], last: str) -> str:
        words = [rng.choice(filler) for _ in range(10)]
        for i, w in zip(rng.sample(range(10), len(middle)), middle):
            words[i] = w
        return " ".join(words + [last])

    al = tiny.CONCEPT_WORDS["alpha"]
    # The feeling runs through the text; how it ends says nothing.
    middle = _write(tmp_path / "mid", [text(rng.sample(al, 3), rng.choice(filler)) for _ in range(30)],
                    [text([], rng.choice(filler)) for _ in range(30)])
    assert _cos(model, tok, middle, "mean", d) > 0.8
    assert abs(_cos(model, tok, middle, "last", d)) < 0.3
    # The reverse: what sets alpha apart is its last word; beta's texts mention the words on the way.
    ending = _write(tmp_path / "end", [text([], rng.choice(al)) for _ in range(30)],
                    [text(rng.sample(al, 3), rng.choice(filler)) for _ in range(30)])
    assert _cos(model, tok, ending, "last", d) > 0.8
    assert _cos(model, tok, ending, "mean", d) < 0.3


# --------------------------------------------------------------------------- steering, judged by VADER
def test_vader_is_the_real_package():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    s = SentimentIntensityAnalyzer()
    assert s.polarity_scores("what a wonderful happy day")["compound"] > 0.5
    assert s.polarity_scores("a terrible awful day")["compound"] < -0.5
    assert s.polarity_scores("w12 w7 w3")["compound"] == 0.0


def test_steering_toward_a_planted_concept_moves_vader_the_intended_way():
    """A tiny model whose output layer maps a 'joy' direction to cheerful words and a 'gloom'
    direction to grim ones: steering by the readout must move VADER up for joy, down for gloom."""
    happy, grim = ["wonderful", "happy", "love"], ["terrible", "awful", "hate"]
    model, tok = tiny.make_model("llama", extra_words=happy + grim)
    joy, gloom = tiny.random_unit(64, 11), tiny.random_unit(64, 12)
    gloom = gloom - (gloom @ joy) * joy
    gloom = gloom / gloom.norm()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for words, direction in ((happy, joy), (grim, gloom)):
            for w in words:
                head[tok.convert_tokens_to_ids(w)] = 0.3 * direction  # too small to win unsteered
    readout = Readout(["joy", "gloom"], [2], {2: torch.stack([joy, gloom])})
    cfg = SteeringConfig(fractions=(0.01, 30.0), max_new_tokens=6, prompts=("w1 w2 w3", "w4 w5", "w6 w7 w8 w9"),
                         max_perplexity_ratio=1e9)
    result = steering_efficacy(model, tok, readout, {"joy": 0.9, "gloom": -0.9}, cfg)
    weak, strong = result["strengths"]
    assert weak["concepts"]["joy"]["moved_share"] == 0.0  # too weak to change greedy text: no shift
    assert strong["concepts"]["joy"]["moved_share"] == 1.0 and strong["concepts"]["joy"]["mean_shift"] > 0.5
    assert strong["concepts"]["gloom"]["moved_share"] == 1.0 and strong["concepts"]["gloom"]["mean_shift"] < -0.5
    assert result["chosen"]["fraction"] == 30.0 and result["chosen"]["mean_moved_share"] == 1.0
    assert any(w in strong["concepts"]["joy"]["example"] for w in happy)


def test_strength_selection_keeps_the_strongest_fluent_one():
    model, tok = tiny.make_model("llama")
    readout = Readout(["joy"], [2], {2: tiny.random_unit(64, 1)[None]})
    cfg = SteeringConfig(fractions=(0.01, 1000.0), max_new_tokens=4, prompts=("w1 w2",), max_perplexity_ratio=1.0 + 1e-9)
    result = steering_efficacy(model, tok, readout, {"joy": 0.5}, cfg)
    fluent = [s["fluent"] for s in result["strengths"]]
    chosen = result["chosen"]["fraction"]
    assert chosen == max([s["fraction"] for s in result["strengths"] if s["fluent"]], default=0.01)
    assert fluent[0] or chosen == 0.01


# --------------------------------------------------------------------------- amygdala eval
def test_eval_cli_reports_heldout_and_geometry(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "r"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--readout", str(out), "--corpus", str(corpus), "--model", str(model), "--no-steering",
                 "--json", "--out", str(tmp_path / "e")]) == 0
    result = json.loads(capsys.readouterr().out)
    held = result["validity"]["heldout"]
    assert set(held) == {"1", "2", "all"} and held["all"]["n"] == 24
    assert held["all"]["concept_top1"] > held["all"]["chance"]["concept_top1"]
    assert set(result["validity"]["geometry"]) == {"1", "2"}
    assert (tmp_path / "e" / "eval.json").is_file() and "Held-out accuracy" in (tmp_path / "e" / "eval.html").read_text()
    # The per-token view, old and new construction side by side, from the same forward.
    pt = result["validity"]["per_token"]
    assert pt["stories"] == 24 and pt["tokens"] > 24 and set(pt["variants"]) == set(VARIANTS)
    assert all(0 <= r["token_cluster_top1"] <= 1 for r in pt["variants"].values())
    assert "Per-token view" in (tmp_path / "e" / "eval.html").read_text()
    assert main(["eval", "--readout", str(out), "--corpus", str(corpus), "--model", str(model), "--no-steering"]) == 0
    assert "concept top-1" in capsys.readouterr().out


def test_eval_bad_steer_concept_fails_before_the_model_loads(planted, tmp_path, capsys):
    model, corpus, _ = planted
    out = tmp_path / "r"
    main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(out), "--quiet"])
    (model / "model.safetensors").unlink()
    capsys.readouterr()
    rc = main(["eval", "--readout", str(out), "--corpus", str(corpus), "--model", str(model), "--steer-concepts", "alpah"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown concept 'alpah'; nearest: alpha" in err[0]
