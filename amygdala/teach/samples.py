"""The training-sample file: one JSON object per line, versioned, read all-or-nothing.

Why a file format of our own between conversations and ``/train``: the sources differ (chat
logs, scored notes, the dream loop, distillation) and the server takes token IDs of one model;
text samples in one shape can be inspected, filtered, merged and re-tokenized for any model.

A line::

    {"v": 1, "context": [{"role": "user", "content": "..."}] | "text",
     "chosen": "...", "rejected": "..." | null, "scores": {"calm": 0.8}, "source": "..."}

``v`` is the format version (1; absent means 1, any other value is refused so a newer file is
never half-understood). ``context``: chat messages (the turns before the answer) or plain text.
``chosen``: the continuation to learn. ``rejected`` (optional): the continuation to move away
from (orpo/dpo). ``scores`` (optional): concept -> finite number. ``source`` (optional): where
the sample came from. Unknown fields are errors. Blank lines are skipped.

Reading checks every line first and raises one :class:`SampleError` naming the file, line and
field of the first bad one, so nothing is submitted from a file with any bad line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from amygdala import AmygdalaError

VERSION = 1
FIELDS = ("v", "context", "chosen", "rejected", "scores", "source")
ROLES = ("system", "user", "assistant", "tool", "developer")


class SampleError(AmygdalaError):
    """A bad line of a sample (or source) file: the message names the file, line and field."""


Context = str | tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TeachSample:
    """One sample; ``context`` is text or a tuple of (role, content) messages."""

    context: Context
    chosen: str
    rejected: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    source: str | None = None

    def to_json(self) -> dict:
        ctx = self.context if isinstance(self.context, str) else [{"role": r, "content": c} for r, c in self.context]
        out: dict = {"v": VERSION, "context": ctx, "chosen": self.chosen}
        if self.rejected is not None:
            out["rejected"] = self.rejected
        if self.scores:
            out["scores"] = dict(self.scores)
        if self.source is not None:
            out["source"] = self.source
        return out


def parse_messages(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """A list of {"role", "content"} objects (content a string) -> tuple of pairs; raises SampleError."""
    if not isinstance(value, list):
        raise SampleError(f"{where}: expected a list of {{\"role\", \"content\"}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SampleError(f"{where}[{i}]: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise SampleError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise SampleError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        out.append((role, content))
    return tuple(out)


def scores_of(value: object, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise SampleError(f"{where}: expected an object of concept -> number, got {type(value).__name__}")
    out = {}
    for name, x in value.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise SampleError(f"{where}.{name}: {x!r} is not a finite number")
        out[str(name)] = float(x)
    return out


def parse_sample(raw: object, where: str) -> TeachSample:
    """One decoded line -> TeachSample; ``where`` ("FILE:LINE") prefixes every error."""
    if not isinstance(raw, dict):
        raise SampleError(f"{where}: expected a JSON object with context and chosen, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SampleError(f"{where}: field {unknown[0]!r}: unknown; a sample has {', '.join(FIELDS)}")
    if raw.get("v", VERSION) != VERSION:
        raise SampleError(f"{where}: field 'v': version {raw['v']!r}, this amygdala reads version {VERSION}; "
                          "upgrade amygdala or rewrite the file")
    for key in ("context", "chosen"):
        if key not in raw:
            raise SampleError(f"{where}: field {key!r}: missing")
    ctx = raw["context"]
    if isinstance(ctx, str):
        if not ctx:
            raise SampleError(f"{where}: field 'context': empty; give the text (or messages) the answer follows")
        context: Context = ctx
    else:
        context = parse_messages(ctx, f"{where}: field 'context'")
        if not context:
            raise SampleError(f"{where}: field 'context': no messages; give at least the user's turn")
    for key in ("chosen", "rejected"):
        value = raw.get(key)
        if key == "rejected" and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise SampleError(f"{where}: field {key!r}: expected a non-empty string, got {value!r:.60}")
    scores = scores_of(raw["scores"], f"{where}: field 'scores'") if raw.get("scores") is not None else {}
    source = raw.get("source")
    if source is not None and not isinstance(source, str):
        raise SampleError(f"{where}: field 'source': expected a string, got {type(source).__name__}")
    return TeachSample(context, raw["chosen"], raw.get("rejected"), scores, source)


def file_lines(path: str | Path) -> list[str]:
    """A UTF-8 file's lines, split at "\n" only (a "\r" before it dropped): the one line reader of JSONL.

    Why not ``str.splitlines``: it also splits at U+2028, U+2029, U+0085 and others, which JSON
    written with ``ensure_ascii=False`` keeps raw inside strings, so a sample could not be read back."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"{path}: cannot read ({e})") from None
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def loads(line: str, where: str):
    """``json.loads`` whose every failure is a SampleError (deep nesting raises RecursionError)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SampleError(f"{where}: not JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
    except RecursionError:
        raise SampleError(f"{where}: JSON nested too deeply; one flat JSON object per line") from None


def json_lines(path: str | Path) -> Iterable[tuple[int, object]]:
    """(line number, decoded JSON) of each non-blank line; a line that is not JSON is a SampleError."""
    for n, line in enumerate(file_lines(path), 1):
        if line.strip():
            yield n, loads(line, f"{path}:{n}")


def read_numbered(path: str | Path) -> list[tuple[int, TeachSample]]:
    """(line number, sample) of every sample of a file, or one SampleError for the first bad line."""
    samples = [(n, parse_sample(raw, f"{path}:{n}")) for n, raw in json_lines(path)]
    if not samples:
        raise SampleError(f"{path}: no samples; one JSON object per line with context and chosen")
    return samples


def read_samples(path: str | Path) -> list[TeachSample]:
    """Every sample of a file, or one SampleError for the first bad line (nothing partial)."""
    return [s for _, s in read_numbered(path)]


def write_samples(path: str | Path, samples: Iterable[TeachSample]) -> int:
    """Write samples (a new file, replaced whole: written aside, then renamed); how many."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
