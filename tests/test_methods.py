"""Extraction methods: planted-direction recovery, the subspace method's maths, method flags,
reading under --chat-template, --direct-dir."""

import json
import random

import pytest
import torch

from helpers import tiny
from amygdala import AmygdalaError
from amygdala.activations import collect, encode
from amygdala.cli.main import main
from amygdala.corpus import load_corpus
from amygdala.pipeline import BuildConfig, build
from amygdala.methods import EIGENVALUES_KEPT, METHODS, TokenSubspaces, check_params, concept_sets, fit
from amygdala.methods.aggregators import pairs
from amygdala.methods.subspace import rowspace, subspace, top_eigenpairs, weighted_direction
from amygdala.readout import Readout

# --------------------------------------------------------------------------- planted directions
HIDDEN = 32
CONCEPT_AXIS, SCENE_AXIS = 3, 5
#: The scene reaches the read token of every alpha positive and of the scene baselines.
SCENE_SCALE = 0.7
#: Methods whose vector keeps part of the scene: they weigh what positives share, and the scene
#: is shared by all positives but only some negatives. The others discount it: linear and L1
#: logistic fit what *separates* the classes, and the concept axis alone separates them;
#: denoised projects out the neutral texts' top component, and the scene baselines are neutral.
HURT_BY_SCENE = {"diffmean", "mean", "pca", "logistic", "subspace"}
ROBUST_TO_SCENE = {"linear", "logistic_l1", "denoised"}
#: Methods for real contrastive pairs only, refused on a folder corpus (tests/test_corpus_pairs.py).
PAIRS_ONLY = {"pca_diff"}


def axis(i: int) -> torch.Tensor:
    v = torch.zeros(HIDDEN)
    v[i] = 1.0
    return v


@pytest.fixture(scope="module")
def scene_setup(tmp_path_factory):
    """Activations and token bases of a tiny model where alpha's words carry the concept axis
    plus a scene axis, and 300 of alpha's negatives end in a scene word carrying the scene too.

    The planted directions are coordinate axes. Every method but logistic_l1 is rotation
    equivariant, so for them an axis is as good as any direction; L1 is built for a concept that
    lives in few coordinates, and an axis is that case. Each concept has 300 words so no word
    repeats often (word identity stays isotropic noise), and 200 positives per concept, so
    ``linear`` (which whitens by a covariance estimated from them) is well determined.
    """
    lex = {c: tiny.LEXICON[300 * i : 300 * (i + 1)] for i, c in enumerate(("alpha", "beta", "gamma"))}
    model, tok = tiny.make_model("llama", hidden=HIDDEN, layers=4, extra_words=tiny.LEXICON)
    tiny.plant(model, tok, lex["alpha"], 2 * axis(CONCEPT_AXIS) + SCENE_SCALE * axis(SCENE_AXIS), 1.0)
    tiny.plant(model, tok, tiny.SCENE_WORDS, axis(SCENE_AXIS), SCENE_SCALE)
    root = tiny.write_corpus(
        tmp_path_factory.mktemp("scene") / "corpus", per_concept=200, scene_baselines=300,
        lexicon=lex, filler=tiny.LEXICON[900:],
    )
    corpus = load_corpus(root)
    tokens = TokenSubspaces([1, 2], HIDDEN)
    # The planted words reach the read token, so the scene effect is measured at ``last`` pooling.
    acts = collect(model, tok, corpus.text_list(), [1, 2], pooling="last", on_tokens=tokens.add, progress=False)
    return acts, concept_sets(corpus, acts), tokens


@pytest.mark.parametrize("method", [m for m in METHODS if m not in PAIRS_ONLY])
def test_every_method_recovers_planted_direction_and_shows_scene(scene_setup, method):
    acts, sets, tokens = scene_setup
    result = fit(method, acts, sets, tokens=tokens)
    for layer, v in result.vectors.items():
        torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
        alpha = v[0]
        assert alpha[CONCEPT_AXIS] > 0.9, (method, layer, alpha[CONCEPT_AXIS])
        scene = float(alpha[SCENE_AXIS])
        if method in HURT_BY_SCENE:
            assert scene > 0.1, (method, layer, scene)
        else:
            assert abs(scene) < 0.05, (method, layer, scene)
    assert HURT_BY_SCENE | ROBUST_TO_SCENE | PAIRS_ONLY == set(METHODS)


def test_pairs_only_methods_refuse_a_corpus_without_pairs(scene_setup):
    acts, sets, tokens = scene_setup
    for method in PAIRS_ONLY:
        with pytest.raises(AmygdalaError, match=f"--method {method} needs contrastive pairs"):
            fit(method, acts, sets, tokens=tokens)


# --------------------------------------------------------------------------- subspace maths
def shared_subspace_texts(seed: int, hidden: int = 48, shared: int = 3, n_pos: int = 12, n_neg: int = 30):
    """Token matrices: positives mix a ``shared``-dim subspace U into random tokens; negatives
    are random. Returns (matrices, U [shared, hidden], positive rows, negative rows)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(hidden, shared, generator=g)).Q.T
    mats = []
    for i in range(n_pos + n_neg):
        x = torch.randn(8, hidden, generator=g)
        if i < n_pos:
            x[:shared] = torch.randn(shared, shared, generator=g) @ u * 3
        mats.append(x)
    return mats, u, list(range(n_pos)), list(range(n_pos, n_pos + n_neg))


def fit_subspace(mats, pos, neg, eigen_k, rows=None, pooled=None):
    """Subspace fit of one concept at layer 0 from raw token matrices (``rows``: which to add)."""
    hidden = mats[0].shape[1]
    store = TokenSubspaces([0], hidden)
    for r in rows if rows is not None else range(len(mats)):
        store.add(r, 0, mats[r], start=1)
    if pooled is None:
        pooled = torch.stack([m.mean(0) for m in mats])
    v, extras = subspace(pooled, [torch.tensor(pos)], [torch.tensor(neg)], 0, tokens=store, eigen_k=eigen_k)
    return v[0], extras["subspace_eigenvalues"][0]


def test_weighted_top_k_eigenvectors_span_the_shared_subspace():
    mats, u, pos, neg = shared_subspace_texts(seed=0)
    v, values = fit_subspace(mats, pos, neg, eigen_k=3)
    assert (u @ v).norm() / v.norm() > 0.99  # inside span(U)
    assert values[2] > 0.6 and values[3] < 0.3  # three shared directions, then a gap
    # Not just the top eigenvector: each of U's three directions carries weight.
    top1, _ = fit_subspace(mats, pos, neg, eigen_k=1)
    assert abs(float(v @ top1) / v.norm()) < 0.9


def dense_d(mats, pos, neg):
    """M_pos - M_neg in float64, independently of rowspace(): every singular value kept."""

    def projector(x):
        vh = torch.linalg.svd(x.double(), full_matrices=False).Vh
        return vh.T @ vh

    return sum(projector(mats[i]) for i in pos) / len(pos) - sum(projector(mats[i]) for i in neg) / len(neg)


def test_eigenvalues_land_in_the_output_and_match_a_dense_eigendecomposition():
    mats, _, pos, neg = shared_subspace_texts(seed=1)
    _, values = fit_subspace(mats, pos, neg, eigen_k=5)
    assert values.shape == (EIGENVALUES_KEPT,)
    dense = torch.linalg.eigvalsh(dense_d(mats, pos, neg)).flip(0)[:EIGENVALUES_KEPT]
    torch.testing.assert_close(values.double(), dense, atol=1e-4, rtol=0)


def test_a_concept_whose_positives_span_fewer_dimensions_than_eigenvalues_kept():
    # One positive of two tokens, in coordinates the negatives never use: its 2-dim subspace is
    # invariant under D, so a solver that started from it alone would stop with 2 eigenvalues.
    g = torch.Generator().manual_seed(6)
    positive = torch.zeros(2, 32)
    positive[:, :2] = torch.randn(2, 2, generator=g)
    negatives = [torch.cat([torch.zeros(5, 2), torch.randn(5, 30, generator=g)], 1) for _ in range(10)]
    mats = [positive] + negatives
    _, values = fit_subspace(mats, [0], list(range(1, 11)), eigen_k=5)
    dense = torch.linalg.eigvalsh(dense_d(mats, [0], list(range(1, 11)))).flip(0)[:EIGENVALUES_KEPT]
    torch.testing.assert_close(values.double(), dense, atol=1e-4, rtol=0)


def test_negative_eigenvalues_are_clamped():
    # Positives span exactly a 2-dim U, so D has at most two positive eigenvalues: of the top 5,
    # three are negative. Clamped, they add nothing: the vector is the top two's weighted sum.
    g = torch.Generator().manual_seed(2)
    hidden = 24
    u = torch.linalg.qr(torch.randn(hidden, 2, generator=g)).Q.T
    mats = [torch.randn(2, 2, generator=g) @ u for _ in range(6)] + [torch.randn(16, hidden, generator=g) for _ in range(20)]
    pos, neg = list(range(6)), list(range(6, 26))
    pooled = torch.stack([m.mean(0) for m in mats])
    v, values = fit_subspace(mats, pos, neg, eigen_k=5, pooled=pooled)
    assert (values[2:5] < 0).all() and (values[:2] > 0).all()
    lam, vecs = torch.linalg.eigh(dense_d(mats, pos, neg))
    lam, vecs = lam.flip(0)[:5].float(), vecs.flip(1)[:, :5].float()
    toward = pooled[pos].mean(0) - pooled[neg].mean(0)
    signs = torch.sign(vecs.T @ toward)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert cos(v, vecs[:, :2] @ (lam[:2] * signs[:2])) > 0.999
    assert cos(v, vecs @ (lam * signs)) < 0.95  # what it would be without the clamp

    vectors = torch.linalg.qr(torch.randn(5, 3, generator=g)).Q
    got = weighted_direction(torch.tensor([2.0, 1.0, -3.0]), vectors, toward=vectors[:, 0] - vectors[:, 1])
    torch.testing.assert_close(got, 2 * vectors[:, 0] - vectors[:, 1])


def test_held_out_rows_are_taken_out_of_the_shared_sum():
    mats, _, pos, neg = shared_subspace_texts(seed=3)
    pos_in, neg_in = pos[:-1], neg[:-1]  # the last positive and negative are held out
    pooled = torch.stack([m.mean(0) for m in mats])
    v_all, values_all = fit_subspace(mats, pos_in, neg_in, 3, pooled=pooled)
    v_never, values_never = fit_subspace(mats, pos_in, neg_in, 3, rows=pos_in + neg_in, pooled=pooled)
    torch.testing.assert_close(values_all, values_never, atol=1e-4, rtol=0)
    assert float(v_all @ v_never) / (v_all.norm() * v_never.norm()) > 0.999


def test_krylov_solver_matches_dense_eigh_without_spanning_the_space():
    g = torch.Generator().manual_seed(4)
    n = 400
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.linspace(1.0, 0.5, 20), torch.rand(n - 20, generator=g) * 0.4 - 0.2]).double()
    a = (q * spectrum) @ q.T
    columns = []

    def apply(x):
        columns.append(x.shape[1])
        return (a @ x.double()).float()

    values, vectors = top_eigenpairs(apply, n, 20, device=torch.device("cpu"))
    assert sum(columns) < n  # stopped on convergence, well before a dense solve
    torch.testing.assert_close(values.double(), spectrum[:20], atol=1e-4, rtol=0)
    residual = (a.float() @ vectors - vectors * values).norm(dim=0)
    assert residual.max() < 1e-3


def test_token_subspaces_drop_the_sink_and_keep_full_numerical_rank():
    store = TokenSubspaces([0, 3], 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 16, generator=g)
    store.add(0, 0, x, start=0)  # position 0 is the attention sink: dropped
    store.add(0, 3, x, start=1)
    assert store.bases[0][0].shape == (4, 16) and store.bases[3][0].shape == (5, 16)
    repeated = torch.cat([x[:2], x[:2] * 2, x[:1] - x[1:2]])  # five rows, rank 2
    basis = rowspace(repeated)
    vh = torch.linalg.svd(x[:2].double(), full_matrices=False).Vh
    assert basis.shape == (2, 16)
    torch.testing.assert_close(basis.T.double() @ basis.double(), vh.T @ vh, atol=1e-5, rtol=0)
    tall = torch.randn(40, 16, generator=g)  # more tokens than hidden: the whole space
    torch.testing.assert_close(rowspace(tall) @ rowspace(tall).T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(store.total[3], store.bases[3][0].T @ store.bases[3][0])
    with pytest.raises(ValueError, match="added twice"):
        store.add(0, 3, x, start=1)
    with pytest.raises(ValueError, match="not declared"):
        store.add(1, 2, x, start=1)


def test_subspace_without_token_bases_is_a_clear_error(scene_setup):
    acts, sets, _ = scene_setup
    with pytest.raises(AmygdalaError, match="needs per-token activations"):
        fit("subspace", acts, sets)


# --------------------------------------------------------------------------- pairs and params
def test_pairs_cycle_the_smaller_side_in_order():
    pos, neg = torch.arange(3.0)[:, None], torch.arange(10.0, 17.0)[:, None]
    p, n = pairs(pos, neg)
    assert p[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0] and n[:, 0].tolist() == list(range(10, 17))
    p, n = pairs(neg[:2], pos)
    assert p[:, 0].tolist() == [10, 11, 10] and n[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one positive"):
        pairs(pos[:0], neg)


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("logistic", {"C": "0.5", "max_iter": "50"}, None),
        ("subspace", {"eigen_k": 3}, None),
        ("diffmean", {"C": "1"}, "diffmean does not take it (accepts: none)"),
        ("logistic", {"c": "1"}, "accepts: C, max_iter"),
        ("logistic", {"C": "lots"}, "C='lots' must be a positive float"),
        ("logistic", {"max_iter": "2.5"}, "max_iter='2.5' must be a positive int"),
        ("subspace", {"eigen_k": 0}, "eigen_k=0 must be a positive int"),
    ],
)
def test_check_params(method, params, message):
    if message is None:
        out = check_params(method, params)
        assert all(type(v) is METHODS[method].params[k] for k, v in out.items())
    else:
        with pytest.raises(AmygdalaError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_params(method, params)


# --------------------------------------------------------------------------- through the CLI


def test_train_subspace_end_to_end(planted, tmp_path):
    model, corpus, d = planted
    out = tmp_path / "out"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2",
                 "--method", "subspace", "--subspace-eigen-k", "1", "--construction", "as_built",
                 "--out", str(out), "--quiet"]) == 0  # the method's own vectors: the planted direction as fitted
    r = Readout.load(out)
    assert all(torch.dot(r.vectors[l][0], d) > 0.9 for l in r.layers)
    info = json.loads((out / "readout.json").read_text())
    assert info["method"] == "subspace" and info["method_params"] == {"eigen_k": 1}

    result = build(load_corpus(corpus), BuildConfig(model=str(model), layers="1,2", method="subspace", progress=False))
    values = result.extras["subspace_eigenvalues"]
    assert set(values) == {1, 2} and values[1].shape == (3, EIGENVALUES_KEPT)
    assert (values[1][:, :-1] >= values[1][:, 1:]).all()  # descending


def test_method_param_reaches_the_method(planted, tmp_path):
    model, corpus, _ = planted
    outs = []
    for c in ("1", "100"):
        out = tmp_path / f"out{c}"
        assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1", "--method",
                     "logistic_l1", "--method-param", f"C={c}", "--pooling", "last", "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "readout.json").read_text())["method_params"] == {"C": float(c)}
        outs.append(Readout.load(out).vectors[1][0])
    # A strong L1 penalty keeps fewer coordinates.
    assert (outs[0].abs() > 1e-6).sum() < (outs[1].abs() > 1e-6).sum()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method-param", "C"], "expected NAME=VALUE"),
        (["--method-param", "nope=1"], "--method-param nope: diffmean does not take it"),
        (["--method", "logistic", "--method-param", "C=-1"], "C='-1' must be a positive float"),
        (["--subspace-eigen-k", "3"], "--subspace-eigen-k applies to --method subspace, not diffmean"),
        (["--method", "subspace", "--subspace-eigen-k", "0"], "eigen_k=0 must be a positive int"),
    ],
)
def test_method_flags_fail_before_model_load(planted, tmp_path, capsys, args, message):
    model, corpus, _ = planted
    (model / "model.safetensors").unlink()  # loading would fail: validation must come first
    rc = main(["build", "--corpus", str(corpus), "--model", str(model), "--out", str(tmp_path / "o"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- chat template
def test_chat_template_reads_the_content_token_not_the_end_of_turn_marker(planted):
    """Trained under --chat-template the planted direction is recovered; the same diff of means
    read at <|im_end|> (the original system's failure) is not: the marker is the same token
    after every text, and only attention carries a rotated trace of the concept there."""
    model_dir, corpus_dir, d = planted
    corpus = load_corpus(corpus_dir)
    result = build(corpus, BuildConfig(model=str(model_dir), layers="1,2", chat_template=True, progress=False))
    assert result.readout.meta["chat_template"]
    for l in (1, 2):
        assert torch.dot(result.readout.vectors[l][0], d) > 0.9

    model, tok = result.model, result.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    at_marker = {1: [], 2: []}
    with torch.no_grad():
        for text in result.activations.texts:
            e = encode(tok, text, chat_template=True)
            marker = e.ids.index(end_of_turn, e.read_index)
            hidden = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
            for l in at_marker:
                at_marker[l].append(hidden[l + 1][0, marker])
    sets = concept_sets(corpus, result.activations)
    for l, rows in at_marker.items():
        x = torch.stack(rows)
        v = x[sets.positives[0]].mean(0) - x[sets.negatives[0]].mean(0)
        assert torch.dot(v / v.norm(), d) < 0.5


# --------------------------------------------------------------------------- --direct-dir
def write_direct(root, rng):
    root.mkdir()
    (root / "alpha.txt").write_text("\n\n".join(tiny.sentence(rng, "alpha") for _ in range(5)) + "\n")
    (root / "_neutral.txt").write_text("\n\n".join(tiny.sentence(rng, None) for _ in range(4)) + "\n")
    return root


def test_direct_dir_combined_with_stories_and_alone(planted, tmp_path, capsys):
    model, corpus, d = planted
    direct = write_direct(tmp_path / "direct", random.Random(9))
    out = tmp_path / "both"
    assert main(["build", "--corpus", str(corpus), "--direct-dir", str(direct), "--model", str(model),
                 "--layers", "1", "--out", str(out), "--quiet"]) == 0
    # 3 x 8 stories + 6 baselines + 5 direct descriptions + 4 neutral ones
    assert "39 unique texts" in capsys.readouterr().out
    assert Readout.load(out).concepts == ["alpha", "beta", "gamma"]

    out = tmp_path / "direct-only"
    assert main(["build", "--direct-dir", str(direct), "--model", str(model), "--layers", "1",
                 "--min-positives", "3", "--out", str(out), "--quiet"]) == 0
    assert "9 unique texts" in capsys.readouterr().out
    r = Readout.load(out)
    # The _neutral file is alpha's only negative set: the descriptions alone find the concept.
    assert r.concepts == ["alpha"] and torch.dot(r.vectors[1][0], d) > 0.9


def test_batched_diffmean_equals_one_concept_at_a_time():
    """diffmean fits every concept in two matrix products; each row must be that concept's
    mean of positives minus mean of negatives, rows in any order, sets of any size."""
    from amygdala.methods.diffmean import diffmean, diffmean_layer

    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(50, 16, generator=g)
    positives = [torch.tensor([3, 1, 7]), torch.tensor([10]), torch.tensor(list(range(20, 40)))]
    negatives = [torch.tensor(sorted(set(range(50)) - set(p.tolist()))) for p in positives]
    got, extras = diffmean_layer(pooled, positives, negatives, 0)
    assert extras == {}
    for i, (p, n) in enumerate(zip(positives, negatives)):
        torch.testing.assert_close(got[i], diffmean(pooled[p], pooled[n]))
