"""``amygdala pairs``: conversations and scored notes -> training samples (:mod:`.samples`).

Transcripts (OpenAI-style JSONL, one conversation per line: ``{"messages": [...]}``):

- every assistant turn is a sample: context = the turns before it, chosen = the turn;
- **regenerated or edited turns**: two or more different assistant turns after the same
  context (in one file, e.g. the same conversation logged once per regeneration) make a
  preference: the version seen *last* is chosen (the one the user kept), each earlier one is
  rejected;
- **correction marker**: a user turn whose first line is ``#correction`` right after an
  assistant turn says "this is what you should have said": chosen = the rest of that user
  turn, rejected = the assistant turn. Later turns see the corrected answer as context, and
  the correction turn itself is dropped.

Scored notes (JSONL, one note per line: ``{"text": ..., "scores": {"calm": 0.8}}`` or
``"tags": "calm: 0.8\\nanxious: 0.1"``, optional ``"context"``): notes that pass every
threshold (``--min calm=0.7 --max anxious=0.3``) become SFT samples, chosen = the text. Scores
missing from a note can be filled by a scorer (the served model's readout, or a local one), so
thresholds work on notes nobody tagged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from amygdala.teach.samples import Context, SampleError, TeachSample, json_lines, parse_messages, scores_of

CORRECTION = "#correction"
# A tag line is "name: number", split at its first ":" and each side matched whole: no pattern
# with two runs of optional spaces around the colon, which backtracked quadratically on a line
# of 8k spaces, ':', 8k spaces.
_TAG_NAME = re.compile(r"[A-Za-z_][\w\- ]*")
_TAG_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _tag(line: str) -> tuple[str, float] | None:
    name, colon, number = line.partition(":")
    name, number = name.strip(), number.strip()
    if not colon or not _TAG_NAME.fullmatch(name) or not _TAG_NUMBER.fullmatch(number):
        return None
    value = float(number)
    return (name.strip(), value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- transcripts
def _correction(content: str) -> str | None:
    """The corrected answer when ``content`` is a correction turn, else None."""
    first, _, rest = content.partition("\n")
    if first.strip().lower() != CORRECTION:
        return None
    return rest.strip()


def transcripts_to_samples(path: str | Path, source: str | None = None) -> list[TeachSample]:
    """Every assistant turn of every conversation; regenerations and corrections as preferences."""
    source = source or Path(path).name
    versions: dict[str, list[str]] = {}  # context key -> distinct assistant versions, in order seen
    contexts: dict[str, tuple[tuple[str, str], ...]] = {}
    corrections: list[TeachSample] = []
    for n, raw in json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(raw, dict) or "messages" not in raw:
            raise SampleError(f"{where}: field 'messages': missing; one conversation per line, {{\"messages\": [...]}}")
        messages = parse_messages(raw["messages"], f"{where}: field 'messages'")
        history: list[tuple[str, str]] = []
        i = 0
        while i < len(messages):
            role, content = messages[i]
            if role == "user" and _correction(content) is not None:
                raise SampleError(f"{where}: field 'messages[{i}]': a {CORRECTION} turn must follow an assistant turn")
            if role != "assistant":
                history.append((role, content))
                i += 1
                continue
            if not history:
                raise SampleError(f"{where}: field 'messages[{i}]': an assistant turn with no turn before it; "
                                  "start the conversation with a user (or system) turn")
            nxt = messages[i + 1] if i + 1 < len(messages) else None
            fixed = _correction(nxt[1]) if nxt is not None and nxt[0] == "user" else None
            if fixed is not None:
                if not fixed:
                    raise SampleError(f"{where}: field 'messages[{i + 1}].content': {CORRECTION} with no corrected "
                                      "text; put the answer on the lines after the marker")
                if not content:
                    raise SampleError(f"{where}: field 'messages[{i}].content': empty assistant turn")
                corrections.append(TeachSample(tuple(history), fixed, content, source=f"{source}:{n}:correction"))
                history.append(("assistant", fixed))
                i += 2
                continue
            if content:
                key = json.dumps(history)
                contexts[key] = tuple(history)
                seen = versions.setdefault(key, [])
                if content in seen:
                    seen.remove(content)  # seen again later: it counts as the later version
                seen.append(content)
            history.append((role, content))
            i += 1
    out: list[TeachSample] = []
    for key, seen in versions.items():
        ctx = contexts[key]
        if len(seen) == 1:
            out.append(TeachSample(ctx, seen[0], source=source))
        else:
            out.extend(TeachSample(ctx, seen[-1], earlier, source=f"{source}:regenerated") for earlier in seen[:-1])
    return out + corrections


# --------------------------------------------------------------------------- scored notes
def parse_tags(value: object, where: str) -> dict[str, float]:
    """Tag lines (``calm: 0.8``), as one string or a list of strings -> scores."""
    lines = value.split("\n") if isinstance(value, str) else value
    if not isinstance(lines, list):
        raise SampleError(f"{where}: expected tag lines like 'calm: 0.8', got {type(value).__name__}")
    out = {}
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise SampleError(f"{where}[{i}]: expected a tag line like 'calm: 0.8', got {type(line).__name__}")
        if not line.strip():
            continue
        tag = _tag(line)
        if tag is None:
            raise SampleError(f"{where}: line {line[:80]!r}: expected 'concept: number', e.g. 'calm: 0.8'")
        out[tag[0]] = tag[1]
    return out


@dataclass(frozen=True)
class Note:
    context: Context
    text: str
    scores: dict[str, float]
    where: str


def read_notes(path: str | Path, default_context: str) -> list[Note]:
    """Every note of a file, or one SampleError for the first bad line."""
    notes = []
    for n, raw in json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(raw, dict):
            raise SampleError(f"{where}: expected an object with text and scores or tags")
        unknown = sorted(set(raw) - {"text", "scores", "tags", "context"})
        if unknown:
            raise SampleError(f"{where}: field {unknown[0]!r}: unknown; a note has text, scores, tags, context")
        text = raw.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SampleError(f"{where}: field 'text': expected a non-empty string")
        scores = scores_of(raw["scores"], f"{where}: field 'scores'") if raw.get("scores") is not None else {}
        if raw.get("tags") is not None:
            scores.update(parse_tags(raw["tags"], f"{where}: field 'tags'"))
        ctx = raw.get("context", default_context)
        if isinstance(ctx, list):
            ctx = parse_messages(ctx, f"{where}: field 'context'")
        elif not isinstance(ctx, str) or not ctx:
            raise SampleError(f"{where}: field 'context': expected text or messages")
        notes.append(Note(ctx, text, scores, where))
    return notes


@dataclass(frozen=True)
class Thresholds:
    """Per concept: a note passes when score >= minimum and score <= maximum for every one named."""

    minimum: Mapping[str, float]
    maximum: Mapping[str, float]

    @property
    def concepts(self) -> list[str]:
        return sorted(set(self.minimum) | set(self.maximum))

    def passes(self, scores: Mapping[str, float]) -> bool:
        return (all(c in scores and scores[c] >= v for c, v in self.minimum.items())
                and all(c in scores and scores[c] <= v for c, v in self.maximum.items()))


#: texts -> one {concept: score} per text (the served readout, or a local one).
Scorer = Callable[[Sequence[str]], list[dict[str, float]]]


def notes_to_samples(notes: Sequence[Note], thresholds: Thresholds, scorer: Scorer | None = None,
                     source: str = "notes") -> tuple[list[TeachSample], dict[str, int]]:
    """(selected SFT samples, counts). A note missing a thresholded concept is scored by ``scorer``
    (its own scores win where both exist) or, without one, counted as ``unscored`` and left out."""
    need = [i for i, n in enumerate(notes) if any(c not in n.scores for c in thresholds.concepts)]
    filled: dict[int, dict[str, float]] = {}
    if need and scorer is not None:
        for i, scores in zip(need, scorer([notes[i].text for i in need])):
            filled[i] = {**scores, **notes[i].scores}
    counts = {"notes": len(notes), "selected": 0, "below_threshold": 0, "unscored": 0, "scored_by_readout": len(filled)}
    out = []
    for i, note in enumerate(notes):
        scores = filled.get(i, note.scores)
        if any(c not in scores for c in thresholds.concepts):
            counts["unscored"] += 1
        elif thresholds.passes(scores):
            counts["selected"] += 1
            kept = {c: scores[c] for c in thresholds.concepts}
            out.append(TeachSample(note.context, note.text, scores=kept, source=f"{source}:{note.where.rsplit(':', 1)[-1]}"))
        else:
            counts["below_threshold"] += 1
    return out, counts
