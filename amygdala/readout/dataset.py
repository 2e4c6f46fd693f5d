"""``read --file``: a whole file of texts scored in batched forwards, one summary (or per-token)
row per text, written resumably to a table (:mod:`amygdala.readout.tables`).

Why a library function and not a shell loop over ``amygdala read``: the loop reloads the model per
text and runs one unbatched forward each; here the model loads once and each text goes through
one padded forward, whose recorded scores give the statistics too (no second forward).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amygdala import AmygdalaError
from amygdala.fields import finite, is_int
from amygdala.readout.filter import ReadoutFilter
from amygdala.readout.format import Readout
from amygdala.readout.runtime import attach
from amygdala.readout.tables import OUTPUTS, open_table
from amygdala.readout.text import TextScores, smooth_causal
from amygdala.crash import crash_point

INPUTS = (".txt", ".jsonl", ".csv")


@dataclass
class Item:
    """One input text: its id (the file's ``id`` or the line index), where it came from (for
    errors) and the input's other fields, carried through to the output."""

    id: Any
    text: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)


def _check_id(value: Any, where: str) -> Any:
    if isinstance(value, str) or is_int(value):
        return value
    if finite(value) is not None:
        raise AmygdalaError(f"{where}: id {value!r} must be a whole number or a string")
    raise AmygdalaError(f"{where}: id must be a whole number or a string, got {json.dumps(value)[:40]}")


def read_items(path: Path) -> list[Item]:
    """Every text of a ``.txt`` (one per line), ``.jsonl`` (``text``, optional ``id``, other fields
    carried) or ``.csv`` file (a ``text`` column, optional ``id``), ids checked unique up front so a
    bad file fails before the model loads and before anything is written."""
    ext = path.suffix.lower()
    if ext not in INPUTS:
        raise AmygdalaError(f"--file {path}: unknown extension {path.suffix or '(none)'!r}; use .txt, .jsonl or .csv")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AmygdalaError(f"--file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise AmygdalaError(f"--file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items: list[Item] = []
    if ext == ".txt":
        items = [Item(i, t, i + 1) for i, t in enumerate(raw.splitlines())]
    elif ext == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AmygdalaError(f"{where}: not JSON ({e.msg}); each line must be one object with a \"text\" field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise AmygdalaError(f"{where}: needs a \"text\" field holding a string")
            ident = _check_id(obj["id"], where) if "id" in obj else len(items)
            items.append(Item(ident, obj["text"], n, {k: v for k, v in obj.items() if k not in ("id", "text")}))
    else:
        reader = csv.DictReader(raw.splitlines(keepends=True))
        if "text" not in (reader.fieldnames or []):
            raise AmygdalaError(f"{path}: no \"text\" column in the header {reader.fieldnames}")
        for row in reader:
            n = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise AmygdalaError(f"{path} line {n}: {len(reader.fieldnames or [])} columns in the header, another number here")
            ident = row["id"] if "id" in row else len(items)
            items.append(Item(ident, row["text"], n, {k: v for k, v in row.items() if k not in ("id", "text")}))
    seen: dict[str, int] = {}
    for it in items:
        if (key := str(it.id)) in seen:
            raise AmygdalaError(f"{path} line {it.line}: id {it.id!r} again (first on line {seen[key]}); ids must be unique")
        seen[key] = it.line
    return items


def check_paths(path: Path, out: Path) -> None:
    """Refuse a bad input file, an unknown output extension or a parquet output without pyarrow,
    before the model loads."""
    read_items(path)
    if out.suffix.lower() not in OUTPUTS:
        raise AmygdalaError(f"--out {out}: unknown extension {out.suffix or '(none)'!r}; use .parquet, .csv or .jsonl")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise AmygdalaError(f"--out {out}: parquet needs pyarrow: pip install 'amygdala[tables]'") from None


def _batch_scores(model, tokenizer, readout: Readout, texts: list[str], against: str | None,
                  smooth: int) -> list[TextScores]:
    """:func:`~amygdala.readout.text.score_text` of each text, in one right-padded forward: each
    text is tokenized on its own (the same ids as ``score_text``) and padding after the text
    changes nothing before it in a causal model."""
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    width = max(1, *(len(e) for e in encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for j, e in enumerate(encoded):
        ids[j, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[j, : len(e)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode(), attach(model, readout) as session:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    scores = (session.zscores(against) if readout.has_stats else session.scores()).float().cpu()
    tracks = session.track_zscores()
    special = set(tokenizer.all_special_ids)
    out = []
    for j, e in enumerate(encoded):
        keep = [pos for pos, tid in enumerate(e) if tid not in special]
        sink = torch.tensor([pos == 0 for pos in keep], dtype=torch.bool)
        out.append(TextScores(
            tokens=[tokenizer.decode([e[pos]]) for pos in keep], positions=keep,
            scores=smooth_causal(scores[j, keep], smooth, sink), zscore=readout.has_stats,
            against=(against or readout.default_statistics) if readout.has_stats else None,
            track_names=list(readout.track_names) or None,
            tracks=None if tracks is None else smooth_causal(tracks[j].float().cpu()[keep], smooth, sink),
            smooth=smooth,
        ))
    return out


def _num(x: float) -> float | None:
    """A statistic over no tokens is NaN; tables get a null instead (JSON has no NaN)."""
    return None if math.isnan(x) else x


def summary_row(scored: TextScores, concepts: list[str], top: int) -> dict[str, Any]:
    """n_tokens, per concept the mean and max (over the tokens, of the layer-averaged score),
    the ``emotionality`` track's mean where the file has it, and the ``top`` concepts by mean.
    ``concepts`` names the columns of ``scored`` (the readout's, or a filter's kept ones).
    The attention sink (position 0) enters no statistic: its score is not comparable."""
    real = torch.tensor([p != 0 for p in scored.positions], dtype=torch.bool)
    per_token = scored.scores.mean(1)[real] if len(scored.positions) else torch.zeros(0, len(concepts))
    mean = per_token.mean(0) if per_token.shape[0] else torch.full((len(concepts),), math.nan)
    peak = per_token.max(0).values if per_token.shape[0] else torch.full((len(concepts),), math.nan)
    row: dict[str, Any] = {"n_tokens": len(scored.positions)}
    for k, c in enumerate(concepts):
        row[f"{c}.mean"] = _num(float(mean[k]))
        row[f"{c}.max"] = _num(float(peak[k]))
    if scored.track_names and "emotionality" in scored.track_names and scored.tracks is not None:
        e = scored.tracks[:, :, scored.track_names.index("emotionality")].mean(1)[real]
        row["emotionality"] = _num(float(e.mean())) if e.numel() else None
    order = [] if per_token.shape[0] == 0 else mean.topk(min(top, len(concepts))).indices.tolist()
    row["top"] = ",".join(concepts[i] for i in order)
    return row


def token_table_rows(scored: TextScores, concepts: list[str]) -> list[dict[str, Any]]:
    """Per token: position, token, the layer-averaged score of every concept (``concepts`` names
    the columns of ``scored``), the tracks (the layer average, as
    :func:`~amygdala.readout.text.token_rows` gives them)."""
    rows = []
    per_token = scored.scores.mean(1)
    for i, (pos, token) in enumerate(zip(scored.positions, scored.tokens)):
        row: dict[str, Any] = {"position": pos, "token": token, "attention_sink": pos == 0}
        row.update({c: float(per_token[i, k]) for k, c in enumerate(concepts)})
        if scored.tracks is not None and scored.track_names:
            row.update({n: float(scored.tracks[i, :, k].mean()) for k, n in enumerate(scored.track_names)})
        rows.append(row)
    return rows


def _shown(readout: Readout, select: ReadoutFilter | None) -> list[str]:
    """The concepts a table has columns for: the filter's kept ones, else every concept."""
    return list(readout.concepts) if select is None else list(select.names)


#: Columns that hold no score: their names never carry the layers.
_PLAIN = {"id", "text", "n_tokens", "position", "token", "attention_sink", "top"}


def _layer_tag(readout: Readout, select: ReadoutFilter | None) -> str:
    """``@9+15`` when ``select`` keeps some of the readout's layers, else empty: a score averaged
    over other layers is another quantity, so its column is named apart (``calm.mean@15``) and a
    table of another ``--layers`` is refused on resume instead of mixed."""
    if select is None or list(select.layer_ids) == list(readout.layers):
        return ""
    return "@" + "+".join(map(str, select.layer_ids))


def _tag_row(row: dict[str, Any], tag: str) -> dict[str, Any]:
    return row if not tag else {(k if k in _PLAIN else k + tag): v for k, v in row.items()}


def columns(readout: Readout, items: list[Item], tokens: bool, select: ReadoutFilter | None = None) -> list[str]:
    """The output's columns in order: the input's carried fields come after the row's own."""
    shown = _shown(readout, select)
    if tokens:
        own = ["id", "position", "token", "attention_sink", *shown, *readout.track_names]
    else:
        own = ["id", "text", "n_tokens", *(f"{c}.{s}" for c in shown for s in ("mean", "max"))]
        own += ["emotionality"] if "emotionality" in readout.track_names else []
        own += ["top"]
    tag = _layer_tag(readout, select)
    own = [c if c in _PLAIN else c + tag for c in own]
    extra: dict[str, None] = {}
    for it in items:
        for k in it.extra:
            if k in own:
                raise AmygdalaError(f"line {it.line}: input field {k!r} is also an output column; rename it")
            extra.setdefault(k)
    return own + list(extra)


def score_rows(model, tokenizer, readout: Readout, items: list[Item], *, against: str | None = None,
               smooth: int = 1, top: int = 3, tokens: bool = False, batch_size: int = 16,
               select: ReadoutFilter | None = None) -> Iterator[tuple[list[Item], list[dict[str, Any]]]]:
    """Per batch of ``items``: the batch and its output rows (one per text, or one per token),
    of ``select``'s concepts and layers when given (the same slice ``read --concepts`` shows)."""
    if readout.has_stats:
        readout.stats_for(against)  # an unknown or missing set fails before the first forward
    shown, tag = _shown(readout, select), _layer_tag(readout, select)
    for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        rows: list[dict[str, Any]] = []
        for it, scored in zip(batch, _batch_scores(model, tokenizer, readout, [it.text for it in batch], against, smooth)):
            if select is not None:
                scored = select.apply(scored)
            if tokens:
                rows += [{"id": it.id, **_tag_row(r, tag), **it.extra} for r in token_table_rows(scored, shown)]
            else:
                rows.append({"id": it.id, "text": it.text, **_tag_row(summary_row(scored, shown, top), tag), **it.extra})
        yield batch, rows


def score_file(model, tokenizer, readout: Readout, path: Path, out: Path, *, against: str | None = None,
               smooth: int = 1, top: int = 3, tokens: bool = False, batch_size: int = 16,
               select: ReadoutFilter | None = None,
               on_batch: Callable[[int], None] | None = None,
               on_resume: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Score every text of ``path`` into the table ``out`` (.parquet, .csv, .jsonl), resuming: the
    ids ``out`` already holds are skipped, the rest appended a batch at a time (each batch whole or
    not at all after a kill). Returns (texts scored now, texts already there). ``on_batch`` gets
    each batch's number of texts and ``on_resume`` the number already there (the progress bar).
    ``select``: only its concepts and layers (a table of another selection is refused on resume)."""
    items = read_items(path)
    table = open_table(out, columns(readout, items, tokens, select))
    done = table.done_ids()
    todo = [it for it in items if str(it.id) not in done]
    if on_resume is not None and len(todo) < len(items):
        on_resume(len(items) - len(todo))
    for batch, rows in score_rows(model, tokenizer, readout, todo, against=against, smooth=smooth, top=top,
                                  tokens=tokens, batch_size=batch_size, select=select):
        table.append(rows)
        crash_point("read.batch_written")
        if on_batch is not None:
            on_batch(len(batch))
    return len(todo), len(items) - len(todo)
