"""Resumable output tables for ``read --file``: .jsonl, .csv and .parquet, appended a batch at a
time so that a kill loses at most the batch in flight and never leaves half a row behind.

- jsonl / csv: each batch is written as whole lines, flushed and fsynced. A kill during a write
  can leave a torn last row; opening the file again finds the last complete row and truncates
  after it.
- parquet: ``OUT.parquet`` is a folder of part files ``part-00000.parquet``, ... one per batch,
  each written under a temporary name and renamed into place (the rename is the commit), so a
  part is there whole or not at all. ``pyarrow.parquet.read_table(OUT.parquet)`` reads the folder
  as one table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from amygdala import AmygdalaError

OUTPUTS = (".parquet", ".csv", ".jsonl")


def _fsync_append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Lines:
    """jsonl and csv: whole lines appended, a torn tail truncated on open."""

    def __init__(self, path: Path, cols: list[str]):
        self.path, self.cols, self.ids = path, cols, set()
        self.csv = path.suffix.lower() == ".csv"
        if path.exists() and path.stat().st_size:
            self._recover()
        elif self.csv:
            _fsync_append(path, self._csv_bytes([dict(zip(cols, cols))]))

    def _csv_bytes(self, rows: list[dict[str, Any]]) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.cols, lineterminator="\n")
        w.writerows(rows)
        return buf.getvalue().encode("utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good, start, pending = 0, 0, b""
        header_seen = not self.csv
        for line in data.splitlines(keepends=True):
            pending += line
            # A csv row spans lines where a quoted field holds a newline: it is complete once
            # its quotes balance and it ends with a newline.
            if not pending.endswith(b"\n") or (self.csv and pending.count(b'"') % 2):
                continue
            row = self._parse(pending)
            if row is None:
                break
            if not header_seen:
                if row != self.cols:
                    raise AmygdalaError(f"{self.path}: its columns are another table's (another readout, "
                                        "selection or --tokens); delete it or choose another --out")
                header_seen = True
            else:
                if isinstance(row, dict):
                    if good == 0 and list(row) != self.cols:
                        raise AmygdalaError(f"{self.path}: its rows are another table's (another readout, "
                                            "selection or --tokens); delete it or choose another --out")
                    self.ids.add(str(row.get("id")))
                else:
                    self.ids.add(row[0])
            start += len(pending)
            good, pending = start, b""
        if not header_seen:
            raise AmygdalaError(f"{self.path}: no complete header row; delete it or choose another --out")
        if good < len(data):  # a torn row from a kill: what follows the last whole row goes
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def _parse(self, raw: bytes) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not self.csv:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
        rows = list(csv.reader(io.StringIO(text)))
        return rows[0] if len(rows) == 1 and len(rows[0]) == len(self.cols) else None

    def append(self, rows: list[dict[str, Any]]) -> None:
        if self.csv:
            data = self._csv_bytes(rows)
        else:
            full = [{c: r.get(c) for c in self.cols} for r in rows]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in full).encode("utf-8")
        _fsync_append(self.path, data)

    def done_ids(self) -> set[str]:
        return self.ids


class _Parts:
    """parquet: a folder of part files, one per batch, each renamed into place whole."""

    def __init__(self, path: Path, cols: list[str]):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise AmygdalaError(f"--out {path}: parquet needs pyarrow: pip install 'amygdala[tables]'") from None
        self.pq, self.path, self.cols, self.ids = pq, path, cols, set()
        if path.exists() and not path.is_dir():
            raise AmygdalaError(f"--out {path}: a parquet output is a folder of parts and this is a file; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        for stray in path.glob("*.tmp"):  # a part a kill interrupted before its rename: never committed
            stray.unlink()
        parts = sorted(path.glob("part-*.parquet"))
        self.types: dict[str, Any] = {}
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
        for p in parts:
            schema = self.pq.read_schema(p)
            self.types.update({f.name: f.type for f in schema if not str(f.type) == "null"})
            if schema.names != cols:
                raise AmygdalaError(f"{p}: its columns are another table's (another readout, selection or --tokens); "
                                    "delete the folder or choose another --out")
            self.ids.update(str(v) for v in pq.read_table(p, columns=["id"]).column("id").to_pylist())

    def append(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        arrays = {}
        for c in self.cols:
            a = pa.array([str(r.get(c)) for r in rows] if c == "id" else [_cell(r.get(c)) for r in rows])
            if pa.types.is_null(a.type):  # all null in this batch: the type every part must share
                a = a.cast(self.types.get(c) or (pa.float64() if c.endswith((".mean", ".max")) or c == "emotionality"
                                                 else pa.string()))
            arrays[c] = a
        table = pa.table(arrays)
        self.types.update({c: table.schema.field(c).type for c in self.cols})
        final = self.path / f"part-{self.next:05d}.parquet"
        tmp = final.with_suffix(".tmp")
        self.pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.next += 1

    def done_ids(self) -> set[str]:
        return self.ids


def _cell(v: Any) -> Any:
    """Carried input fields may be lists or objects: parquet gets them as JSON text."""
    return json.dumps(v) if isinstance(v, (dict, list)) else v


def open_table(path: Path, cols: list[str]) -> _Lines | _Parts:
    """The output table at ``path`` by its extension, the ids it already holds read (resume)."""
    ext = path.suffix.lower()
    if ext not in OUTPUTS:
        raise AmygdalaError(f"--out {path}: unknown extension {path.suffix or '(none)'!r}; use .parquet, .csv or .jsonl")
    if ext == ".parquet":
        return _Parts(path, cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _Lines(path, cols)
