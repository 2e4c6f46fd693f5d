"""The quality report: planted cases on tiny models and synthetic vectors, the files it writes,
and bad input (the captures it reads: tests/test_quality_sites.py)."""

import json
import re

import pytest
import torch
from sklearn.linear_model import Ridge

from helpers import tiny
from amygdala.cli.main import main
from amygdala.corpus import load_corpus
from amygdala.pipeline import BuildConfig, build
from amygdala.methods import ConceptSets
from amygdala.quality import metrics
from amygdala.quality.config import QualityConfig, QualityError
from amygdala.quality.html import render
from amygdala.quality.report import QualityInputs, compute, triage_table
from amygdala.quality.run import from_build

PLOTS = ["plot-affect-", "plot-triage", "plot-cohesion", "plot-spectra", "plot-heatmap-", "plot-map-"]


def synthetic(offsets: dict[str, torch.Tensor], clusters: list[str], vectors=None, n_neg: int = 40, seed: int = 0):
    """QualityInputs at one layer (0) from each concept's positives, given as offsets from a
    background of ``n_neg`` small-noise texts; vectors are the diff of means unless given."""
    g = torch.Generator().manual_seed(seed)
    hidden = next(iter(offsets.values())).shape[1]
    rows = [o for o in offsets.values()] + [0.05 * torch.randn(n_neg, hidden, generator=g)]
    pooled = torch.cat(rows)
    pos, start = [], 0
    for o in offsets.values():
        pos.append(torch.arange(start, start + len(o)))
        start += len(o)
    everything = torch.arange(len(pooled))
    neg = [everything[~torch.isin(everything, p)] for p in pos]
    if vectors is None:
        vectors = torch.stack([pooled[p].mean(0) - pooled[n].mean(0) for p, n in zip(pos, neg)])
    concepts = list(offsets)
    return QualityInputs(
        concepts=concepts, clusters=clusters, layers=[0], vectors={0: metrics.unit_rows(vectors).float()},
        pooled={0: pooled}, sets=ConceptSets(concepts, pos, neg), text_names=[f"t{i}" for i in range(len(pooled))],
    )


def units(n: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return metrics.unit_rows(torch.randn(n, hidden, generator=g))


# ----------------------------------------------------------------------------- metrics
def test_ridge_redundancy_equals_separate_sklearn_fits():
    v = units(12, 48, 0).double()
    v[3] = metrics.unit_rows(v[0] + 0.5 * v[1] + 0.05 * v[3])
    r2, coef = metrics.ridge_redundancy(v, 0.01)
    for i in range(12):
        others = [j for j in range(12) if j != i]
        fit = Ridge(alpha=0.01, fit_intercept=False).fit(v[others].T.numpy(), v[i].numpy())
        torch.testing.assert_close(coef[i, others], torch.from_numpy(fit.coef_), atol=1e-8, rtol=1e-6)
        resid = v[i] - v[others].T @ torch.from_numpy(fit.coef_)
        assert abs(float(r2[i]) - (1 - float(resid @ resid) / float(v[i] @ v[i]))) < 1e-8
    assert coef.diagonal().abs().max() == 0


def test_cluster_similarity_and_cohesion_equal_explicit_loops():
    v = units(9, 16, 1).double()
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    cos = v @ v.T
    sim = metrics.cluster_similarity(cos, labels, 3)
    coh = metrics.cohesion(cos, labels, 3)
    for i in range(9):
        for k in range(3):
            members = [j for j in range(9) if labels[j] == k and j != i]
            centroid = v[members].sum(0)
            torch.testing.assert_close(sim[i, k], torch.dot(v[i], centroid) / centroid.norm())
    for k in range(3):
        inside = [j for j in range(9) if labels[j] == k]
        outside = [j for j in range(9) if labels[j] != k]
        within = torch.stack([cos[a, b] for a in inside for b in inside if a != b]).mean()
        between = cos[inside][:, outside].mean()
        torch.testing.assert_close(coh[k], within - between)
    lone = metrics.cluster_similarity(cos, torch.tensor([0] * 8 + [1]), 2)
    assert torch.isnan(lone[8, 1]) and not torch.isnan(lone[0, 1])


def test_geometry_matches_pca_and_is_sign_stable():
    v = units(30, 20, 2).double()
    ratio, scores = metrics.geometry(v, 5)
    centred = v - v.mean(0)
    s = torch.linalg.svdvals(centred)
    torch.testing.assert_close(ratio, (s**2 / (s**2).sum())[:5])
    torch.testing.assert_close(scores.abs(), (centred @ torch.linalg.svd(centred)[2][:2].T).abs())
    _, flipped = metrics.geometry(-v, 5)
    torch.testing.assert_close(flipped, scores)


def test_neuron_alignment_and_contributions_find_the_planted_neuron():
    down = torch.randn(32, 100, generator=torch.Generator().manual_seed(3))
    v = torch.stack([down[:, 17] / down[:, 17].norm(), units(1, 32, 4)[0]])
    idx, cos = metrics.neuron_alignment(v, down)
    assert idx[0] == 17 and cos[0] == pytest.approx(1.0) and abs(cos[1]) < 0.6
    act_diff = torch.zeros(2, 100)
    act_diff[:, 42] = 5.0
    act_diff[:, 17] = 0.1
    contrib = metrics.neuron_contributions(v, down, act_diff)
    assert contrib[0].abs().argmax() in (17, 42) and contrib[1].abs().argmax() == 42
    torch.testing.assert_close(contrib.sum(1), (v.double() @ down.double() @ act_diff.double().T).diagonal())


def test_head_stats_on_synthetic_heads():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 4 * 8, generator=g)
    x[:20, 8:16] += 6.0 * units(1, 8, 6)[0]  # the positives differ in head 1 only
    pos = metrics.membership([torch.arange(20)], 60)
    neg = metrics.membership([torch.arange(20, 60)], 60)
    norms, sel = metrics.head_stats(x, pos, neg, 4)
    assert norms[0].argmax() == 1 and sel[0].argmax() == 1 and sel[0, 1] > 4 * sel[0, [0, 2, 3]].max()
    assert metrics.concentration(norms[0], 1) > 0.6
    xh = x.reshape(60, 4, 8)
    d = xh[:20].mean(0) - xh[20:].mean(0)
    u = d / d.norm(dim=1, keepdim=True)
    want = d.norm(dim=1) / torch.einsum("nhd,hd->nh", xh[20:], u).std(0)
    torch.testing.assert_close(sel[0], want.double())


# ----------------------------------------------------------------------------- planted cases
def test_sum_of_two_concepts_is_redundant_and_an_orthogonal_one_is_not():
    v = units(10, 64, 7)
    summed = metrics.unit_rows(v[0] + v[1])
    basis = torch.linalg.qr(torch.cat([v, summed[None]]).T)[0]  # orthonormal span of all the others
    free = torch.randn(64, generator=torch.Generator().manual_seed(8))
    free = metrics.unit_rows(free - basis @ (basis.T @ free))
    vectors = torch.cat([v, summed[None], free[None]])
    names = [f"c{i}" for i in range(10)] + ["summed", "free"]
    offsets = {n: 3 * vectors[i] + 0.01 * torch.randn(6, 64, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    report = compute(synthetic(offsets, ["k"] * 12, vectors=vectors))
    s = report["concepts"]["summed"]["layers"]["0"]["redundancy"]
    assert s["r2"] > 0.9 and "redundant" in report["concepts"]["summed"]["buckets"]
    top = dict(s["top"][:2])
    expected = 1 / float((v[0] + v[1]).norm())  # summed = (c0 + c1) / |c0 + c1|
    assert set(top) == {"c0", "c1"} and all(abs(c - expected) < 0.02 for c in top.values()), s["top"]
    assert all(abs(c) < 0.05 for _, c in s["top"][2:])
    f = report["concepts"]["free"]
    assert f["layers"]["0"]["redundancy"]["r2"] < 0.01 and "redundant" not in f["buckets"]
    assert report["concepts"]["summed"]["layers"]["0"]["nearest_concepts"][0][0] in ("c0", "c1")


def test_concept_in_another_clusters_direction_is_wrong_cluster():
    hidden = 64
    a, b = units(2, hidden, 9)
    g = torch.Generator().manual_seed(10)

    def near(d):
        return metrics.unit_rows(d + 0.4 * metrics.unit_rows(torch.randn(hidden, generator=g)))

    names = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "stray"]
    vectors = torch.stack([near(a) for _ in range(4)] + [near(b) for _ in range(3)] + [near(b)])
    clusters = ["A"] * 4 + ["B"] * 3 + ["A"]  # the manifest puts stray in A; its vector is B's
    offsets = {n: 3 * vectors[i] + 0.01 * torch.randn(5, hidden, generator=g) for i, n in enumerate(names)}
    report = compute(synthetic(offsets, clusters, vectors=vectors))
    stray = report["concepts"]["stray"]["cluster"]
    assert stray == {**stray, "manifest": "A", "nearest": "B", "wrong_cluster": True} and stray["margin"] > 0.3
    assert report["triage"]["wrong_cluster"]["concepts"] == ["stray"]
    coh = report["clusters"]
    assert coh["B"]["cohesion"]["0"] > 0.5 and coh["A"]["cohesion"]["0"] < coh["B"]["cohesion"]["0"]


def test_two_unrelated_story_groups_are_fragmented_and_one_group_is_not():
    """Offsets of k unrelated equal groups put at most 1/k of their energy on one axis, so two
    groups sit at 0.5 of the shared signal; real stories also vary one by one (here 30% of
    the energy), which brings two groups under 0.4 while one group stays near 0.7."""
    hidden, n = 128, 20
    a, b, c = torch.linalg.qr(torch.randn(hidden, 3, generator=torch.Generator().manual_seed(11)))[0].T
    g = torch.Generator().manual_seed(12)

    def noisy(direction):
        noise = torch.randn(n, hidden, generator=g)
        noise = noise / noise.norm(dim=1, keepdim=True) * (0.3 / 0.7) ** 0.5 * 4
        return 4 * direction + noise

    def alone(offsets):  # one concept per report: no other concept's texts among its negatives
        return compute(synthetic({"x": offsets}, ["k"]))["concepts"]["x"]

    split = alone(torch.cat([noisy(a)[: n // 2], noisy(b)[: n // 2]]))
    whole, clear = alone(noisy(c)), alone(4 * a + 0.05 * torch.randn(n, hidden, generator=g))
    assert split["first_pc_variance_ratio_mean"] < 0.4 and "fragmented" in split["buckets"]
    assert whole["first_pc_variance_ratio_mean"] > 0.6 and "fragmented" not in whole["buckets"]
    assert clear["first_pc_variance_ratio_mean"] > 0.95 and clear["buckets"] == ["clean"]
    noiseless = alone(torch.cat([4 * a.expand(5, -1), 4 * b.expand(5, -1)]))
    assert noiseless["first_pc_variance_ratio_mean"] == pytest.approx(0.5, abs=0.02)
    align = dict(split["layers"]["0"]["alignment"])
    assert set(split["layers"]["0"]["outliers"]) <= set(align) and len(split["layers"]["0"]["outliers"]) == 2
    assert max(align.values()) < 0.9 < min(dict(clear["layers"]["0"]["alignment"]).values())


def plant_in_head(model, head: int, direction: torch.Tensor, scale: float) -> None:
    """Layer 0's value projection reads ``direction`` into ``head`` only (the other heads'
    value rows are made orthogonal to it)."""
    attn = model.model.layers[0].self_attn
    head_dim = attn.v_proj.weight.shape[0] // model.config.num_key_value_heads
    with torch.no_grad():
        w = attn.v_proj.weight
        w -= torch.outer(w @ direction, direction)
        w[head * head_dim : (head + 1) * head_dim] += scale * torch.outer(tiny.random_unit(head_dim, 8), direction)


@pytest.fixture()
def head_planted(tmp_path):
    model, tok = tiny.make_model("llama", hidden=64, layers=4, heads=4)
    d = tiny.random_unit(64, 7)
    tiny.plant(model, tok, tiny.CONCEPT_WORDS["alpha"], d, 1.0)
    plant_in_head(model, 2, d, 2.0)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tiny.write_corpus(tmp_path / "corpus")


def test_train_quality_report_finds_the_planted_head_and_writes_every_plot(head_planted, tmp_path, capsys):
    model, corpus = head_planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "0,2", "--out", str(out),
                 "--quiet", "--quality-report"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^bucket\s+n\s+worst first\s+next action$", printed, re.M)
    assert "add paired scenarios that hold the setting fixed" in printed and "report.html" in printed
    q = json.loads((out / "quality.json").read_text())
    heads = q["concepts"]["alpha"]["layers"]["0"]["per_head"]
    assert heads["top"][0][0] == 2 and heads["head_concentration"] > 0.9 and heads["k"] == 1
    assert q["concepts"]["alpha"]["layers"]["2"]["per_head"]["head_concentration"] < 0.6
    assert q["skipped"] == [] and q["n_heads"] == 4 and q["layers"] == [0, 2]
    neuron = q["concepts"]["alpha"]["layers"]["0"]["neuron_alignment"]
    assert 0 <= neuron["neuron"] < 128 and len(neuron["top_contributions"]) == 10
    assert set(q["triage"]) == {"fragmented", "redundant", "wrong_cluster", "mixed", "clean"}
    assert {c for t in q["triage"].values() for c in t["concepts"]} == {"alpha", "beta", "gamma"}

    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for plot in PLOTS:
        for fid in ([plot] if not plot.endswith("-") else [f"{plot}0", f"{plot}2"]):
            assert re.search(rf'<figure id="{fid}"><img src="data:image/png;base64,[A-Za-z0-9+/=]{{1000,}}"', page), fid
    for c in ("alpha", "beta", "gamma"):
        assert f'id="c-{c}"' in page and f'href="#c-{c}"' in page
    held = q["validity"]["heldout"]
    assert set(held) == {"0", "2", "all"} and held["all"]["n"] > 0 and set(q["validity"]["geometry"]) == {"0", "2"}
    assert 'id="validity"' in page and "Held-out accuracy" in page and "published study" in page


def test_standalone_quality_equals_the_training_report(head_planted, tmp_path, capsys):
    model, corpus = head_planted
    main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "0,2", "--out", str(tmp_path / "r"),
          "--quiet", "--quality-report"])
    assert main(["quality", "--readout", str(tmp_path / "r"), "--corpus", str(corpus), "--model", str(model),
                 "--out", str(tmp_path / "q"), "--quiet", "--redundant-r2", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    trained = json.loads((tmp_path / "r" / "quality.json").read_text())
    alone = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert alone["config"]["redundant_r2"] == 0.5 and trained["config"]["redundant_r2"] == 0.9
    for c in trained["concepts"]:
        for l in ("0", "2"):
            t, a = trained["concepts"][c]["layers"][l], alone["concepts"][c]["layers"][l]
            for key in ("first_pc_variance_ratio", "per_head", "neuron_alignment", "redundancy"):
                assert t[key] == a[key], (c, l, key)
    assert (tmp_path / "q" / "report.html").is_file()


def test_one_forward_serves_training_and_report(head_planted, monkeypatch):
    model_dir, corpus_dir = head_planted
    corpus = load_corpus(corpus_dir)
    result = build(corpus, BuildConfig(model=str(model_dir), layers="0,2", progress=False, quality_sites=True))
    assert result.activations.forwards == -(-len(corpus.text_list()) // 16)
    assert set(result.activations.sites) == {"attn.0", "mlp.0", "attn.2", "mlp.2"}
    import amygdala.quality.run as run

    monkeypatch.setattr(run, "collect_corpus", lambda *a, **k: pytest.fail("the report ran the model again"))
    report = from_build(result, corpus)
    assert report["concepts"]["alpha"]["layers"]["0"]["per_head"]["top"][0][0] == 2
    assert "alpha" in triage_table(report)


# ----------------------------------------------------------------------------- layouts the report meets
def test_hybrid_layers_are_listed_as_skipped(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny.make_tokenizer()
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=0, mlp_only_layers=[0, 1], pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    corpus = load_corpus(tiny.write_corpus(tmp_path / "c"))
    result = build(corpus, BuildConfig(model=str(tmp_path / "m"), layers="0,1", progress=False, quality_sites=True))
    report = from_build(result, corpus)
    [skipped] = report["skipped"]
    assert skipped["layer"] == 0 and skipped["metric"] == "per_head"
    assert "linear_attn (Qwen3NextGatedDeltaNet)" in skipped["reason"]
    alpha = report["concepts"]["alpha"]["layers"]
    assert "per_head" not in alpha["0"] and "per_head" in alpha["1"] and "neuron_alignment" in alpha["0"]
    assert "layer 0, per_head" in render(report, QualityConfig())


def test_subspace_eigenvalues_reach_the_report(tmp_path):
    model, tok = tiny.make_model("llama", tmp_path / "m")
    corpus = load_corpus(tiny.write_corpus(tmp_path / "c"))
    result = build(corpus, BuildConfig(model=str(tmp_path / "m"), layers="1", method="subspace", progress=False, quality_sites=True))
    report = from_build(result, corpus)
    eig = report["concepts"]["alpha"]["layers"]["1"]["subspace_eigvals"]
    assert 1 <= len(eig) <= 20 and eig == sorted(eig, reverse=True)
    assert "eigvals: " in render(report, QualityConfig())


# ----------------------------------------------------------------------------- config and bad input
def test_head_k_keeps_concentration_meaningful_with_few_heads():
    cfg = QualityConfig()
    assert [cfg.head_k(n) for n in (2, 4, 9, 40, 64)] == [1, 1, 2, 10, 10]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fragmented-below", "0.8"], "--fragmented-below 0.8 / --clean-above 0.7"),
        (["--redundant-r2", "1.5"], "--redundant-r2 1.5: must be in (0, 1]"),
        (["--ridge-lambda", "-1"], "--ridge-lambda -1.0: must be >= 0"),
    ],
)
def test_bad_thresholds_fail_before_the_model_loads(head_planted, tmp_path, capsys, flags, message):
    model, corpus = head_planted
    (model / "model.safetensors").unlink()
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--out", str(tmp_path / "o"), "--quiet",
                 "--quality-report", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(QualityError):
        QualityConfig(fragmented_below=0.8)


def test_quality_bad_input_is_one_line(head_planted, tmp_path, capsys):
    model, corpus = head_planted
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    other = tiny.write_corpus(tmp_path / "other", concepts=("alpha", "beta"))
    wrong_size = tmp_path / "wide"
    tiny.make_model("llama", wrong_size, hidden=32)
    (wrong_size / "model.safetensors").unlink()
    for args, message in [
        (["--readout", str(tmp_path / "nope"), "--corpus", str(corpus)], "readout.json: missing"),
        (["--readout", str(tmp_path / "r"), "--corpus", str(other)], "no concept gamma of the readout in this corpus's manifest"),
        (["--readout", str(tmp_path / "r"), "--corpus", str(corpus), "--model", str(wrong_size)], "does not fit wide (hidden size 32)"),
        (["--readout", str(tmp_path / "r"), "--corpus", str(corpus), "--clean-above", "2"], "--clean-above 2.0"),
    ]:
        capsys.readouterr()
        model_args = [] if "--model" in args else ["--model", str(model)]
        assert main(["quality", *args, *model_args, "--out", str(tmp_path / "q"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
    assert not (tmp_path / "q").exists()
