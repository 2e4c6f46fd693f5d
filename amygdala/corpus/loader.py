"""Read a corpus folder into texts and per-concept positive / negative sets.

Layout (the corpus's README.md): ``manifest.toml``, ``stories/<concept>.txt``,
``paired/<scenario>/{baseline,<concept>}.txt``, ``direct/<concept>.txt``, ``direct/_<name>.txt``
and ``neutral/<name>.txt``. Everything that can be checked without a model is checked here, so
that a bad corpus fails in seconds instead of after a minutes-long model load.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.corpus.lint_config import LintConfig

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

#: Kinds of text. Positives of a concept are its ``story``, ``paired`` and ``direct`` texts.
#: ``baseline`` (a paired scenario told flat) and ``neutral`` (``direct/_*.txt`` and
#: ``neutral/*.txt``: texts with no feeling) belong to no concept.
STORY, PAIRED, BASELINE, DIRECT, NEUTRAL = "story", "paired", "baseline", "direct", "neutral"
#: The negative half of a contrastive pair (``Corpus.from_pairs``, ``build --pairs``): a negative
#: of its own concept only (``Text.negative_of``), and not neutral text.
NEGATIVE = "negative"


class CorpusError(AmygdalaError):
    """The corpus cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Text:
    """One paragraph of the corpus."""

    text: str
    path: Path
    line: int  # 1-based line where the paragraph starts
    kind: str
    concept: str | None  # None for baselines and neutral descriptions
    setting: str | None
    negative_of: str | None = None  # the concept whose pair this is the negative half of

    def where(self, root: Path | None = None) -> str:
        path = self.path
        if root is not None:
            try:
                path = self.path.relative_to(root)
            except ValueError:
                pass
        return f"{path}:{self.line}"


@dataclass(frozen=True)
class Affect:
    """A concept's place on the valence (-1 unpleasant .. 1 pleasant) and arousal (0 calm .. 1
    activated) axes, and where the numbers come from (a lexicon entry or ``rubric``)."""

    valence: float
    arousal: float
    source: str


@dataclass
class Corpus:
    """A loaded corpus. ``concepts`` keeps manifest order: it is the row order of every readout."""

    root: Path | None
    concepts: list[str]
    concept_cluster: dict[str, str]
    descriptions: dict[str, str]
    clusters: dict[str, str]
    texts: list[Text]
    lint: LintConfig = field(default_factory=LintConfig)
    paired_dirs: list[Path] = field(default_factory=list)
    #: Per concept, its valence and arousal (None where the manifest gives none).
    affect: dict[str, Affect | None] = field(default_factory=dict)
    #: Per cluster, "positive" / "negative" where the manifest says (``polarity``).
    polarity: dict[str, str] = field(default_factory=dict)
    #: Per concept built from pairs, its (positive, negative) texts in order (corpus/pairs.py).
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, pairs, **kw) -> Corpus:  # {concept: [(positive, negative), ...]}; corpus/pairs.py
        from amygdala.corpus.pairs import from_pairs
        return from_pairs(pairs, **kw)

    @classmethod
    def from_texts(cls, texts, **kw) -> Corpus:  # {concept: [texts]}, neutral=[...]; corpus/pairs.py
        from amygdala.corpus.pairs import from_texts
        return from_texts(texts, **kw)

    def valence(self) -> list[float | None]:
        return [a.valence if (a := self.affect.get(c)) else None for c in self.concepts]

    def arousal(self) -> list[float | None]:
        return [a.arousal if (a := self.affect.get(c)) else None for c in self.concepts]

    def concept_polarity(self) -> list[str | None]:
        """Each concept's cluster polarity, in manifest order."""
        return [self.polarity.get(self.concept_cluster[c]) for c in self.concepts]

    def positives(self, concept: str) -> list[Text]:
        return [t for t in self.texts if t.concept == concept]

    def negatives(self, concept: str) -> list[Text]:
        """Every other concept's positives, baselines and neutral texts; a pair concept: its pairs' negatives."""
        if concept in self.pairs:
            return [t for t in self.texts if t.negative_of == concept]
        return [t for t in self.texts if t.concept != concept]

    def settings(self, concept: str) -> set[str]:
        return {t.setting for t in self.positives(concept) if t.setting}

    def text_list(self) -> list[str]:
        """Every text in corpus order (a text in two files appears twice; the forward runs it once)."""
        return [t.text for t in self.texts]

    def sha256(self) -> str:
        """A hash of every text, its kind and concept: changes when any build input changes."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(f"{t.kind}\0{t.concept}\0{t.text}\n".encode())
            if t.negative_of is not None:  # only then: a folder corpus's hash stays what it was
                h.update(f"negative_of\0{t.negative_of}\n".encode())
        return h.hexdigest()

    def cluster_of(self) -> list[str]:
        """Each concept's cluster, in manifest order."""
        return [self.concept_cluster[c] for c in self.concepts]

    def neutral_texts(self) -> list[Text]:
        return [t for t in self.texts if t.kind in (BASELINE, NEUTRAL)]

    def subset(self, concepts: list[str]) -> Corpus:
        """The corpus as if the manifest listed only ``concepts`` (their negatives shrink too)."""
        unknown = [c for c in concepts if c not in self.concept_cluster]
        if unknown:
            raise CorpusError(
                f"--concepts: {', '.join(unknown)} not in the manifest; "
                f"nearest: {', '.join(nearest_names(unknown[0], self.concepts))}"
            )
        keep = set(concepts)
        order = [c for c in self.concepts if c in keep]
        texts = [t for t in self.texts if (t.concept is None or t.concept in keep)
                 and (t.negative_of is None or t.negative_of in keep)]
        pairs = {c: p for c, p in self.pairs.items() if c in keep}
        return replace(self, concepts=order, texts=texts, pairs=pairs)

    def require_positives(self, min_positives: int) -> None:
        """Raise when a concept cannot be built: fewer than ``min_positives`` texts."""
        short = [(c, len(self.positives(c))) for c in self.concepts]
        short = [(c, n) for c, n in short if n < min_positives]
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in short[:8])
            more = f" and {len(short) - 8} more" if len(short) > 8 else ""
            raise CorpusError(
                f"{self.root}: {len(short)} concept(s) have fewer than {min_positives} positive "
                f"texts: {listed}{more}; add texts, lower --min-positives, or pick --concepts"
            )


def nearest_names(name: str, names: list[str], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, names, n=n, cutoff=0.0)


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def parse_paragraphs(path: Path) -> list[tuple[int, str, dict[str, str]]]:
    """Paragraphs of a text file as (start line, text, tags). ``# key: value`` lines are tags."""
    out: list[tuple[int, str, dict[str, str]]] = []
    lines: list[str] = []
    tags: dict[str, str] = {}
    start = 0

    def flush() -> None:
        if lines or tags:
            out.append((start, " ".join(lines), dict(tags)))
        lines.clear()
        tags.clear()

    for no, raw in enumerate(read_text_file(path).splitlines(), 1):
        line = raw.strip()
        if not line:
            flush()
            continue
        if not lines and not tags:
            start = no
        if line.startswith("#"):
            key, sep, value = line.lstrip("#").partition(":")
            if sep:
                tags[key.strip().lower()] = value.strip()
            continue
        lines.append(line)
    flush()
    return out


def _read_manifest(path: Path) -> tuple[dict, LintConfig]:
    if not path.is_file():
        raise CorpusError(f"{path}: missing; every corpus needs a manifest.toml listing its concepts")
    try:
        data = tomllib.loads(read_text_file(path))
    except tomllib.TOMLDecodeError as e:
        raise CorpusError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    concepts = data.get("concepts")
    if not isinstance(concepts, dict) or not concepts:
        raise CorpusError(f"{path}: no [concepts.<name>] tables; list at least one concept")
    clusters = data.get("clusters", {})
    for name, entry in concepts.items():
        if not NAME_RE.match(name):
            raise CorpusError(f"{path}: concept name {name!r} is not lower_snake_case; rename it")
        if not isinstance(entry, dict) or not isinstance(entry.get("cluster"), str):
            raise CorpusError(f"{path}: [concepts.{name}] needs cluster = \"<cluster name>\"")
        if clusters and entry["cluster"] not in clusters:
            raise CorpusError(
                f"{path}: [concepts.{name}] cluster {entry['cluster']!r} has no "
                f"[clusters.{entry['cluster']}] table; add it or fix the name"
            )
    lint_table = data.get("lint", {})
    known = set(LintConfig.__dataclass_fields__)
    bad = sorted(set(lint_table) - known)
    if bad:
        raise CorpusError(f"{path}: unknown [lint] key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    if "trouble_concepts" in lint_table:
        lint_table = {**lint_table, "trouble_concepts": tuple(lint_table["trouble_concepts"])}
    return data, LintConfig(**lint_table)


def _affect(name: str, entry: dict) -> Affect | None:
    """The entry's ``valence`` / ``arousal`` / ``affect_source``, range-checked; None when absent."""
    if "valence" not in entry and "arousal" not in entry:
        return None
    v, a = entry.get("valence"), entry.get("arousal")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not -1.0 <= v <= 1.0:
        raise CorpusError(f"manifest.toml: [concepts.{name}] valence = {v!r}: give a number in [-1, 1]")
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= a <= 1.0:
        raise CorpusError(f"manifest.toml: [concepts.{name}] arousal = {a!r}: give a number in [0, 1]")
    return Affect(float(v), float(a), str(entry.get("affect_source", "unspecified")))


def _polarity(clusters: dict) -> dict[str, str]:
    out = {}
    for name, entry in clusters.items():
        value = entry.get("polarity") if isinstance(entry, dict) else None
        if value is None:
            continue
        if value not in ("positive", "negative"):
            raise CorpusError(f"manifest.toml: [clusters.{name}] polarity = {value!r}: use \"positive\" or \"negative\", or leave it out")
        out[name] = value
    return out


def _texts_from_file(
    path: Path, kind: str, concept: str | None, setting: str | None
) -> list[Text]:
    paragraphs = parse_paragraphs(path)
    if not paragraphs:
        warnings.warn(f"{path}: empty file, skipped", stacklevel=3)
        return []
    texts = []
    for line, text, tags in paragraphs:
        if not text:
            continue
        texts.append(Text(text, path, line, kind, concept, tags.get("setting", setting)))
    return texts


def _concept_entries(root: Path | None, direct_dir: Path | None, manifest: dict) -> dict:
    """The manifest's concepts; with no corpus folder, the direct folder's file names."""
    if root is None and direct_dir is not None:
        names = sorted(p.stem for p in direct_dir.glob("*.txt") if not p.stem.startswith("_"))
        if not names:
            raise CorpusError(f"{direct_dir}: no <concept>.txt files; add direct descriptions")
        return {n: {"cluster": "unclustered", "description": ""} for n in names}
    return dict(manifest["concepts"])


class _Reader:
    """Reads files into texts, recording a bad file in ``problems`` (when a list) instead of raising."""

    def __init__(self, concepts: list[str], problems: list[CorpusError] | None):
        self.concepts, self.known, self.problems = concepts, set(concepts), problems
        self.texts: list[Text] = []

    def _fail(self, err: CorpusError) -> None:
        if self.problems is None:
            raise err
        self.problems.append(err)

    def add(self, path: Path, kind: str, setting: str | None) -> None:
        concept = None
        if kind in (STORY, PAIRED, DIRECT):
            concept = path.stem
            if concept not in self.known:
                near = ", ".join(nearest_names(concept, self.concepts))
                return self._fail(CorpusError(
                    f"{path}: no concept {concept!r} in the manifest (nearest: {near}); "
                    "add it to manifest.toml or rename the file"
                ))
        try:
            self.texts.extend(_texts_from_file(path, kind, concept, setting))
        except CorpusError as err:
            self._fail(err)

    def add_folder(self, root: Path) -> list[Path]:
        """stories/, paired/ and neutral/ of a corpus folder; returns the scenario folders."""
        for path in sorted((root / "stories").glob("*.txt")):
            self.add(path, STORY, None)
        scenarios = sorted(p for p in (root / "paired").glob("*") if p.is_dir())
        for scenario in scenarios:
            for path in sorted(scenario.glob("*.txt")):
                self.add(path, BASELINE if path.stem == "baseline" else PAIRED, scenario.name)
        for path in sorted((root / "neutral").glob("*.txt")):
            self.add(path, NEUTRAL, "neutral")
        return scenarios

    def add_direct(self, folder: Path) -> None:
        for path in sorted(folder.glob("*.txt")):
            self.add(path, NEUTRAL if path.stem.startswith("_") else DIRECT, "direct")


def load_corpus(
    root: str | Path | None,
    *,
    direct_dir: str | Path | None = None,
    include_direct: bool = True,
    problems: list[CorpusError] | None = None,
) -> Corpus:
    """Load and validate a corpus folder.

    ``include_direct`` takes the corpus's own ``direct/`` folder; ``direct_dir`` adds another
    folder of direct descriptions (``_``-prefixed files there are negatives for every concept).
    With ``root=None`` the corpus is the direct folder alone and its concepts are its file names.
    When ``problems`` is a list, a bad file (unknown concept, not UTF-8) is recorded there and
    skipped instead of raising, so the lint can report every problem in one run.
    """
    if root is None and direct_dir is None:
        raise CorpusError("no corpus given; pass a corpus folder (root) and/or a folder of direct descriptions (direct_dir)")
    root_path = Path(root) if root is not None else None
    extra = Path(direct_dir) if direct_dir is not None else None
    if root_path is not None:
        if not root_path.is_dir():
            raise CorpusError(f"{root_path}: corpus folder does not exist; pass an existing corpus folder")
        manifest, lint = _read_manifest(root_path / "manifest.toml")
    else:
        manifest, lint = {"concepts": {}, "clusters": {}}, LintConfig()
    if extra is not None and not extra.is_dir():
        raise CorpusError(f"{extra}: direct descriptions folder does not exist")
    direct_dirs = [root_path / "direct"] if root_path is not None and include_direct and (root_path / "direct").is_dir() else []
    direct_dirs += [extra] if extra is not None else []
    entries = _concept_entries(root_path, extra, manifest)
    concepts = list(entries)
    reader = _Reader(concepts, problems)
    paired_dirs = reader.add_folder(root_path) if root_path is not None else []
    for d in direct_dirs:
        reader.add_direct(d)
    if not reader.texts:
        raise CorpusError(f"{root_path if root_path is not None else extra}: corpus has no texts; add stories/<concept>.txt files")
    return Corpus(
        root=root_path,
        concepts=concepts,
        concept_cluster={c: entries[c]["cluster"] for c in concepts},
        descriptions={c: entries[c].get("description", "") for c in concepts},
        clusters={k: v.get("description", "") for k, v in manifest.get("clusters", {}).items()},
        texts=reader.texts,
        lint=lint,
        paired_dirs=paired_dirs,
        affect={c: _affect(c, entries[c]) for c in concepts},
        polarity=_polarity(manifest.get("clusters", {})),
    )
