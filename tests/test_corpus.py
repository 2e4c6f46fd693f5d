"""Corpus loading (positive/negative rules, bad input) and every lint rule on a small bad corpus."""

from pathlib import Path

import pytest

from helpers import tiny
from amygdala.corpus import bundled_corpus
from amygdala.corpus import CorpusError, load_corpus
from amygdala.corpus.check import check_corpus, concept_word_pattern

BUNDLED = bundled_corpus()


def test_positive_and_negative_sets(synthetic_corpus):
    (synthetic_corpus / "direct").mkdir()
    (synthetic_corpus / "direct" / "alpha.txt").write_text("I feel alpha. al1 al2\n")
    (synthetic_corpus / "direct" / "_baseline.txt").write_text("w1 w2 w3\n\nw4 w5 w6\n")
    c = load_corpus(synthetic_corpus)
    assert c.concepts == ["alpha", "beta", "gamma"]
    pos = c.positives("alpha")
    assert len(pos) == 9 and {t.kind for t in pos} == {"story", "direct"}
    neg = c.negatives("alpha")
    assert {t.kind for t in neg} == {"story", "baseline", "neutral"}
    assert not {t.text for t in pos} & {t.text for t in neg}
    assert len(neg) == 8 + 8 + 6 + 2
    assert len(load_corpus(synthetic_corpus, include_direct=False).positives("alpha")) == 8
    sub = c.subset(["beta"])
    assert sub.concepts == ["beta"] and all(t.concept in (None, "beta") for t in sub.texts)


def test_settings_come_from_tags_and_scenarios(synthetic_corpus):
    (synthetic_corpus / "paired" / "room" / "alpha.txt").write_text("al1 w1 w2 al2\n")
    c = load_corpus(synthetic_corpus)
    assert c.settings("alpha") == {"place 0", "place 1", "place 2", "room"}


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda r: __import__("shutil").rmtree(r), "does not exist"),
        (lambda r: (r / "manifest.toml").unlink(), "manifest.toml: missing"),
        (lambda r: (r / "manifest.toml").write_text("[concepts\n"), "not valid TOML"),
        (lambda r: (r / "stories" / "omega.txt").write_text("# setting: x\nw1 w2\n"), "no concept 'omega'"),
        (lambda r: (r / "stories" / "alpha.txt").write_bytes(b"caf\xe9 w1\n"), "not UTF-8"),
        (lambda r: (r / "manifest.toml").write_text('[concepts.Bad-Name]\ncluster = "x"\n'), "lower_snake_case"),
    ],
)
def test_bad_corpus_is_one_clear_error(synthetic_corpus, damage, match):
    damage(synthetic_corpus)
    with pytest.raises(CorpusError, match=match):
        load_corpus(synthetic_corpus)


def test_empty_story_file_warns_and_is_skipped(synthetic_corpus):
    (synthetic_corpus / "stories" / "gamma.txt").write_text("\n\n")
    with pytest.warns(UserWarning, match="empty file"):
        c = load_corpus(synthetic_corpus)
    assert c.positives("gamma") == []
    with pytest.raises(CorpusError, match=r"gamma \(0\)"):
        c.require_positives(3)


def test_concept_word_pattern_catches_forms_not_strangers():
    assert concept_word_pattern("terrified").search("a terrifying sound")
    assert concept_word_pattern("calm").search("she spoke calmly")
    assert concept_word_pattern("happy").search("pure happiness")
    assert concept_word_pattern("at_ease").search("he was at ease")
    assert concept_word_pattern("grief_stricken").search("the grief came")
    assert not concept_word_pattern("mad").search("she made tea")
    assert not concept_word_pattern("content").search("the continent")


def bad_corpus(root: Path) -> Path:
    """A corpus with one instance of every lint problem."""
    words = " ".join(f"w{i}" for i in range(70))
    (root / "stories").mkdir(parents=True)
    (root / "paired" / "hall").mkdir(parents=True)
    (root / "manifest.toml").write_text(
        '[lint]\ntrouble_concepts = ["brave"]\nrequire_affect = true\nmax_setting_share = 0.34\n'
        '[clusters.k]\ndescription = ""\n'
        + "".join(f'[concepts.{c}]\ncluster = "k"\nvalence = 0.1\narousal = 0.5\n' for c in ("calm", "brave", "angry"))
        + '[concepts.lonely]\ncluster = "k"\n'  # no valence/arousal
    )
    story = lambda tag, text: f"# setting: {tag}\n{text}"
    (root / "stories" / "calm.txt").write_text("\n\n".join([
        story("a", "she breathed out calmly " + words),          # names its concept
        story("b", "short text"),                               # too short
        f"no tag here {words} x1",                              # missing setting tag
    ]))
    (root / "stories" / "brave.txt").write_text("\n\n".join([
        story("a", "unique text about a lion " + words), story("a", "another unique text about a river " + words.replace("w1 ", "v1 ")),
        story("a", "third text about hills " + words.replace("w5 ", "v5 ")),
    ]))  # trouble concept: 3 texts in 1 setting
    (root / "stories" / "lonely.txt").write_text(story("c", "identical text " + words) + "\n\n" + story("d", "identical text " + words))
    (root / "stories" / "angry.txt").write_text(story("e", "identical text " + words))  # exact duplicate across concepts
    (root / "stories" / "ghost.txt").write_text(story("f", words))  # not in the manifest
    (root / "paired" / "hall" / "calm.txt").write_text("in the hall " + words)  # no baseline
    (root / "neutral").mkdir()
    (root / "neutral" / "flat.txt").write_text("identical text " + words + "\n\nshort neutral\n")  # a story's copy; too short
    return root


def test_every_lint_rule_fires(tmp_path):
    problems, _, _ = check_corpus(bad_corpus(tmp_path / "bad"))
    text = "\n".join(map(str, problems))
    for expected in [
        "no concept 'ghost'",
        "names its own concept ('calmly'",
        "2 words, outside 60-200",
        "story has no setting tag",
        "trouble concept brave has 3 story/paired texts, needs 5",
        "trouble concept brave has 1 setting(s), needs 3",
        "exact duplicate of stories/angry.txt:1",
        "near-duplicate of",
        "scenario has no baseline.txt",
        "angry has 1 story/paired texts, needs 3",
        "setting 'a' carries 3 of brave's 3 story/paired texts (more than 34%)",
        "[concepts.lonely] has no valence/arousal",
        "neutral/flat.txt:1: exact duplicate of stories/angry.txt:1",
        "neutral/flat.txt:3: 2 words, outside 60-200",
    ]:
        assert expected in text, f"missing lint problem: {expected}\n{text}"
    assert all(": " in line and "; " in line for line in text.splitlines())


def test_lint_is_clean_on_synthetic_corpus(synthetic_corpus):
    problems, warned, corpus = check_corpus(synthetic_corpus)
    assert problems == [] and corpus is not None


@pytest.mark.parametrize(
    "entry, match",
    [
        ("valence = 1.5\narousal = 0.5", r"\[concepts.alpha\] valence = 1.5: give a number in \[-1, 1\]"),
        ("valence = 0.5\narousal = -0.1", r"\[concepts.alpha\] arousal = -0.1: give a number in \[0, 1\]"),
        ('valence = "high"\narousal = 0.5', r"\[concepts.alpha\] valence = 'high'"),
    ],
)
def test_affect_out_of_range_is_one_clear_error(synthetic_corpus, entry, match):
    m = synthetic_corpus / "manifest.toml"
    m.write_text(m.read_text().replace('description = "planted alpha"', f'description = "planted alpha"\n{entry}'))
    with pytest.raises(CorpusError, match=match):
        load_corpus(synthetic_corpus)


def test_cluster_polarity_is_checked_and_read(synthetic_corpus):
    m = synthetic_corpus / "manifest.toml"
    m.write_text(m.read_text().replace('description = "test cluster"', 'description = "test cluster"\npolarity = "positive"'))
    assert load_corpus(synthetic_corpus).concept_polarity() == ["positive"] * 3
    m.write_text(m.read_text().replace('polarity = "positive"', 'polarity = "good"'))
    with pytest.raises(CorpusError, match=r"\[clusters.greek\] polarity = 'good': use \"positive\" or \"negative\""):
        load_corpus(synthetic_corpus)


def test_bundled_corpus_passes_the_lint():
    problems, _, corpus = check_corpus(BUNDLED)
    assert problems == [], "\n".join(map(str, problems[:20]))
    assert len(corpus.concepts) >= 207


def test_bundled_corpus_depth():
    """The thresholds the lint enforces are the ones promised, and the neutral set and the paired
    scenarios are there: every cluster meets every other in some scenario."""
    import itertools

    corpus = load_corpus(BUNDLED)
    lint = corpus.lint
    assert (lint.min_positives, lint.min_settings, lint.trouble_min_positives, lint.trouble_min_settings) == (10, 5, 14, 7)
    assert lint.max_setting_share <= 1 / 3 + 0.01 and lint.require_affect
    assert sum(t.path.parent.name == "neutral" for t in corpus.texts) >= 300
    assert len(corpus.paired_dirs) >= 30
    met = set()
    for scenario in corpus.paired_dirs:
        clusters = {corpus.concept_cluster[p.stem] for p in scenario.glob("*.txt") if p.stem != "baseline"}
        assert (scenario / "baseline.txt").is_file() and len(clusters) >= 2, scenario.name
        met |= {frozenset(pair) for pair in itertools.combinations(clusters, 2)}
    every = {frozenset(pair) for pair in itertools.combinations(set(corpus.concept_cluster.values()), 2)}
    assert every <= met, sorted(tuple(p) for p in every - met)[:5]
    assert all(corpus.affect[c] is not None for c in corpus.concepts)
    assert set(corpus.polarity.values()) == {"positive", "negative"}


def test_corpus_stats(synthetic_corpus, capsys):
    import json

    from amygdala.cli.main import main

    assert main(["corpus", "stats", str(synthetic_corpus), "--json", "--nearest", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    alpha = out["concepts"][0]
    assert alpha["concept"] == "alpha" and alpha["stories"] == 8 and alpha["positives"] == 8 and alpha["settings"] == 3
    assert [o for o, _ in alpha["nearest_by_text"]] and len(alpha["nearest_by_text"]) == 2
    assert out["clusters"] == [{"cluster": "greek", "concepts": 3, "positives": 24, "stories": 24, "paired": 0,
                                "min_positives": 8, "settings": 9}]
    assert main(["corpus", "stats", str(synthetic_corpus)]) == 0
    assert "nearest by text" in capsys.readouterr().out


def test_neutral_texts_that_read_as_emotional_are_flagged(planted, tmp_path, capsys):
    """A neutral text full of alpha's planted words reads as alpha: the check names it; the
    plain ones pass."""
    from amygdala.cli.main import main

    model, corpus, _ = planted
    (corpus / "neutral").mkdir()
    (corpus / "neutral" / "flat.txt").write_text(
        "w1 w2 w3 w4 w5 w6 w7\n\nw8 w9 w10 w11 w12 w13\n\nal1 al2 w14 al3 al4 al5 al6 al7\n")
    out = tmp_path / "r"
    assert main(["build", "--corpus", str(corpus), "--model", str(model), "--layers", "1,2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["corpus", "check", str(corpus), "--readout", str(out), "--model", str(model), "--quiet"])
    captured = capsys.readouterr()
    flagged = [line for line in captured.out.splitlines() if "neutral text reads as" in line]
    assert rc == 1 and len(flagged) == 1 and flagged[0].startswith("neutral/flat.txt:5: neutral text reads as alpha")
    assert "most emotional neutral texts" in captured.err
