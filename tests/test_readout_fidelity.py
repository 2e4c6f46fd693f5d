"""Per-token readout fidelity: the shared direction out, both statistics sets, the tracks, smoothing.

The planted model gives every concept's words one shared direction that neutral text lacks (the
"emotional story vs neutral text" component diffmean puts into every vector) plus each concept's
own direction, and makes the concepts' neutral stds differ. Read per token, the as-built readout
z-scored on neutral text then names the concept with the smallest neutral std on every concept
token; the mean-removed readout z-scored on emotional text names the planted one.
"""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from amygdala.cli.main import main
from amygdala.corpus import load_corpus
from amygdala.pipeline import BuildConfig, build
from amygdala.pipeline.build import TokenStats
from amygdala.readout import Readout, ReadoutError, score_text, smooth_causal
from helpers.tiny import COMMON, CONCEPT_WORDS, make_model, plant, random_unit, sentence, write_corpus

CONCEPTS = ("alpha", "beta", "gamma", "delta")
VALENCE = {"alpha": 0.8, "beta": 0.6, "gamma": -0.6, "delta": -0.8}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    model, tok = make_model(hidden=64, layers=4, seed=0)
    shared = random_unit(64, 100)
    rng = random.Random(3)
    for i, c in enumerate(CONCEPTS):
        plant(model, tok, CONCEPT_WORDS[c], shared, 2.0)
        plant(model, tok, CONCEPT_WORDS[c], random_unit(64, i + 1), 0.5)
        # Filler words vary along concept i's own direction by 0.2 * i: the concepts' neutral stds
        # differ (alpha's smallest), as terrified's (9.7) and curious's (21.1) do on the default model.
        for w in COMMON[:120]:
            plant(model, tok, [w], random_unit(64, i + 1), 0.2 * i * rng.choice([-1, 1]))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    corpus = write_corpus(tmp / "corpus", concepts=CONCEPTS, per_concept=10, baselines=20)
    manifest = corpus / "manifest.toml"
    text = manifest.read_text()
    for c, v in VALENCE.items():
        text = text.replace(f'description = "planted {c}"', f'description = "planted {c}"\nvalence = {v}\narousal = 0.5')
    manifest.write_text(text)
    old = build(load_corpus(corpus), BuildConfig(model=str(tmp / "model"), layers="1,2", progress=False,
                                                 construction="as_built", statistics="neutral")).readout
    new = build(load_corpus(corpus), BuildConfig(model=str(tmp / "model"), layers="1,2", progress=False)).readout
    return model, tok, old, new, tmp


def _concept_tokens(model, tok, readout, against=None):
    """(owner concept, top concept) of every concept-word token of 12 unseen sentences."""
    rng = random.Random(5)
    out = []
    for k in range(12):
        scored = score_text(model, tok, readout, sentence(rng, CONCEPTS[k % 4]), against=against)
        for i, t in enumerate(scored.tokens):
            owner = [c for c in CONCEPTS if t in CONCEPT_WORDS[c]]
            if owner:
                out.append((owner[0], CONCEPTS[int(scored.scores[i].mean(0).argmax())]))
    return out


def test_old_readout_ranks_by_neutral_std_new_finds_the_planted_concept(planted):
    model, tok, old, new, _ = planted
    smallest = CONCEPTS[int(torch.stack([old.std[l] for l in old.layers]).mean(0).argmin())]
    old_pairs = _concept_tokens(model, tok, old)
    assert sum(top == smallest for _, top in old_pairs) >= 0.9 * len(old_pairs)
    assert sum(owner == top for owner, top in old_pairs) <= 0.4 * len(old_pairs)
    new_pairs = _concept_tokens(model, tok, new)
    assert sum(owner == top for owner, top in new_pairs) >= 0.9 * len(new_pairs)
    assert new.construction == "mean_removed" and new.default_statistics == "emotional"
    assert old.construction == "as_built" and old.default_statistics == "neutral"


def test_tracks_emotionality_and_valence(planted):
    model, tok, _, new, _ = planted
    assert new.track_names == ["emotionality", "valence"]
    rng = random.Random(9)
    emo = {"concept": [], "filler": []}
    val = {1: [], -1: []}
    for k in range(12):
        c = CONCEPTS[k % 4]
        scored = score_text(model, tok, new, sentence(rng, c))
        for i, t in enumerate(scored.tokens):
            is_concept = any(t in CONCEPT_WORDS[cc] for cc in CONCEPTS)
            emo["concept" if is_concept else "filler"].append(float(scored.tracks[i, :, 0].mean()))
            if is_concept:
                val[1 if VALENCE[c] > 0 else -1].append(float(scored.tracks[i, :, 1].mean()))
    mean = lambda xs: sum(xs) / len(xs)
    # Emotionality is z over neutral text: filler near 0, concept words far above.
    assert abs(mean(emo["filler"])) < 1.0 and mean(emo["concept"]) > 3.0
    assert mean(val[1]) > mean(val[-1])


def test_format_round_trip_keeps_construction_statistics_and_tracks(planted, tmp_path):
    _, _, _, new, _ = planted
    new.save(tmp_path / "r")
    back = Readout.load(tmp_path / "r")
    info = json.loads((tmp_path / "r" / "readout.json").read_text())
    assert info["construction"] == "mean_removed"
    assert info["statistics"] == {"available": ["neutral", "emotional"], "default": "emotional"}
    assert info["tracks"] == ["emotionality", "valence"]
    assert back.statistics == ["neutral", "emotional"] and back.track_names == new.track_names
    for l in new.layers:
        torch.testing.assert_close(back.emotional_std[l], new.emotional_std[l])
        torch.testing.assert_close(back.track_vectors[l], new.track_vectors[l])
        torch.testing.assert_close(back.track_std[l], new.track_std[l])
    raw = torch.randn(5, 2, 4)
    torch.testing.assert_close(back.zscore(raw), back.zscore(raw, "emotional"))
    assert not torch.allclose(back.zscore(raw, "neutral"), back.zscore(raw, "emotional"))
    # Small: nothing [hidden, hidden] is stored, only per-direction results.
    assert all(t.dim() == 1 or t.shape[0] <= len(new.concepts) for t in load_file(tmp_path / "r" / "readout.safetensors").values())
    m = back.manifest()
    assert m["construction"] == "mean_removed" and m["tracks"] == ["emotionality", "valence"]
    torch.testing.assert_close(torch.tensor(m["std"][0]), back.emotional_std[back.layers[0]])


def test_old_file_loads_and_reads_as_before(tmp_path):
    g = torch.Generator().manual_seed(0)
    vecs = {3: torch.nn.functional.normalize(torch.randn(2, 6, generator=g), dim=1)}
    Readout(["a", "b"], [3], vecs, {3: torch.tensor([1.0, 2.0])}, {3: torch.tensor([2.0, 4.0])}).save(tmp_path / "o")
    info = json.loads((tmp_path / "o" / "readout.json").read_text())
    info.pop("statistics")  # as an older amygdala wrote it
    (tmp_path / "o" / "readout.json").write_text(json.dumps(info))
    old = Readout.load(tmp_path / "o")
    assert old.construction == "as_built" and old.statistics == ["neutral"] and old.default_statistics == "neutral"
    assert old.track_names == [] and "tracks" not in old.manifest()
    raw = torch.tensor([[[3.0, 6.0]]])
    torch.testing.assert_close(old.zscore(raw), torch.tensor([[[1.0, 1.0]]]))
    with pytest.raises(ReadoutError, match="no 'emotional' statistics"):
        old.zscore(raw, "emotional")
    with pytest.raises(ReadoutError, match="expected one of neutral, emotional"):
        old.zscore(raw, "plain")


def test_read_against_and_smooth_on_the_cli(planted, tmp_path, capsys):
    model, _, old, new, tmp = planted
    new.save(tmp_path / "new")
    # As an older amygdala wrote it: neutral statistics only.
    dataclasses.replace(old, emotional_mean=None, emotional_std=None, meta={}).save(tmp_path / "old")
    text = "w1 w2 al1 al2 w3 ga4 w5"
    got = {}
    for against in ("neutral", "emotional"):
        for smooth in ("1", "3"):
            assert main(["read", text, "--readout", str(tmp_path / "new"), "--model", str(tmp / "model"),
                         "--json", "--against", against, "--smooth", smooth, "--top", "4"]) == 0
            got[against, smooth] = json.loads(capsys.readouterr().out)
    assert got["neutral", "1"]["against"] == "neutral" and got["emotional", "3"]["smooth"] == 3
    assert got["neutral", "1"]["tracks"] == ["emotionality", "valence"]
    first = lambda out, pos: dict(out["tokens"][pos]["layers"]["1"])
    assert first(got["neutral", "1"], 2) != first(got["emotional", "1"], 2)
    # --smooth 3: token 4's scores are the mean of tokens 2-4's unsmoothed ones.
    unsmoothed = [first(got["emotional", "1"], i) for i in (2, 3, 4)]
    for c, v in first(got["emotional", "3"], 4).items():
        assert v == pytest.approx(sum(u[c] for u in unsmoothed) / 3, abs=0.02)
    emo = [t["tracks"]["emotionality"] for t in got["emotional", "3"]["tokens"]]
    raw = [t["tracks"]["emotionality"] for t in got["emotional", "1"]["tokens"]]
    assert emo[4] == pytest.approx(sum(raw[2:5]) / 3, abs=0.01)
    # An old readout has no emotional statistics: a one-line error naming what to do.
    assert main(["read", text, "--readout", str(tmp_path / "old"), "--model", str(tmp / "model"), "--against", "emotional"]) == 2
    assert "no 'emotional' statistics" in capsys.readouterr().err
    assert main(["read", text, "--readout", str(tmp_path / "new"), "--model", str(tmp / "model"), "--smooth", "0"]) == 2
    assert "--smooth 0" in capsys.readouterr().err


def test_smooth_causal_by_hand_and_the_sink_stays_out():
    x = torch.tensor([[100.0], [1.0], [2.0], [3.0], [4.0]])
    sink = torch.tensor([True, False, False, False, False])
    out = smooth_causal(x, 2, sink)
    assert out[:, 0].tolist() == [100.0, 1.0, 1.5, 2.5, 3.5]
    assert smooth_causal(x, 3)[:, 0].tolist() == pytest.approx([100.0, 50.5, 103 / 3, 2.0, 3.0])
    assert torch.equal(smooth_causal(x, 1), x)
    with pytest.raises(ValueError, match="at least 1"):
        smooth_causal(x, 0)


def test_statistics_leave_out_the_first_position():
    stats = TokenStats({0}, [1], 3)
    text = torch.tensor([[1000.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    stats.add(0, 1, text, start=0)  # the text's first chunk: position 0 is the sink
    stats.add(0, 1, text[1:], start=2)  # a later chunk of the same text keeps all its positions
    stats.add(1, 1, torch.tensor([[9.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), start=0)  # an emotional text
    assert stats.neutral[1].count == 4 and stats.emotional[1].count == 1
    mean, std = stats.statistics({1: torch.tensor([[1.0, 0.0, 0.0]])})
    assert float(mean[1][0]) == pytest.approx(2.0) and float(std[1][0]) == pytest.approx(1.0)
    emo_mean, _ = stats.statistics({1: torch.tensor([[1.0, 0.0, 0.0]])}, "emotional")
    assert float(emo_mean[1][0]) == pytest.approx(5.0)


def test_the_server_z_scores_with_the_files_default_statistics(planted):
    import numpy as np

    from amygdala.serve.respond import Formatter

    _, _, old, new, _ = planted
    raw = np.ones((len(new.layers), len(new.concepts)), dtype=np.float32)
    for readout in (old, new):
        want = readout.zscore(torch.from_numpy(raw)).numpy()
        assert np.allclose(Formatter(readout).row(raw, "zscore"), want, atol=1e-5)
    assert not np.allclose(Formatter(new).row(raw, "zscore"), new.zscore(torch.from_numpy(raw), "neutral").numpy())
