"""``amygdala read --file``: a file of texts scored in batched forwards into a resumable table.

Oracles: each summary row is recomputed from :func:`score_text` of that text alone (one unbatched
forward), each ``--tokens`` row from :func:`token_rows`; the resume proof kills the CLI with a
crash point after a batch is written (amygdala.crash) and compares with an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amygdala import crash
from amygdala.readout import DEFAULT_SMOOTH, Readout, score_text, token_rows
from helpers.serve import make_readout, make_tiny_model, prompt_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("read-file")
    return make_tiny_model(root / "model"), make_readout(root / "readout", tracks=True)


@pytest.fixture(scope="module")
def hf(files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = files
    return AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)


#: A text scored in a padded batch against the same text alone: the matmuls sum in another order,
#: so fp32 hidden states agree to about 1e-6 relative, and a z-score near 30 (the tiny readout's
#: emotionality) to about 2e-4 absolute. On one machine abs=1e-4 passed and on another it did not.
TOL = {"rel": 2e-5, "abs": 1e-4}

def cli(files, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    model, readout = files
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full.pop(crash.FILE_ENV, None)
    if not env or crash.ENV not in env:
        full.pop(crash.ENV, None)
    return subprocess.run([sys.executable, "-m", "amygdala", "read", *args, "--readout", str(readout),
                           "--model", str(model), "--quiet"], capture_output=True, text=True, timeout=600, env=full)


def cli_here(capsys, files, *args: str) -> subprocess.CompletedProcess:
    """``amygdala read`` in this process: the same ``main``, exit code and stderr as :func:`cli`
    without starting Python and importing torch again (seconds a call). Not for a run that a
    crash point kills."""
    from amygdala.cli.main import main

    model, readout = files
    capsys.readouterr()
    code = main(["read", *args, "--readout", str(readout), "--model", str(model), "--quiet"])
    return subprocess.CompletedProcess([], code, "", capsys.readouterr().err)


def texts(n: int) -> list[str]:
    return [prompt_words(1 + i % 9, seed=i) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_summary_rows_equal_score_text_of_each_text_alone(tmp_path, files, hf, capsys):
    model, tok = hf
    readout = Readout.load(files[1])
    sample = texts(11)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"t{i}", "text": t, "lang": "en"} for i, t in enumerate(sample)])
    out = tmp_path / "out.jsonl"
    proc = cli_here(capsys, files, "--file", str(src), "--out", str(out), "--batch-size", "4", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    rows = read_table(out)
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(11)] and all(r["lang"] == "en" for r in rows)
    for text, row in zip(sample, rows):
        s = score_text(model, tok, readout, text, smooth=DEFAULT_SMOOTH)
        real = [i for i, p in enumerate(s.positions) if p != 0]
        per_token = s.scores[real].mean(1)  # layer average per token
        assert row["text"] == text and row["n_tokens"] == len(s.tokens)
        for k, c in enumerate(readout.concepts):
            assert row[f"{c}.mean"] == pytest.approx(float(per_token[:, k].mean()), **TOL)
            assert row[f"{c}.max"] == pytest.approx(float(per_token[:, k].max()), **TOL)
        emo = s.tracks[real][:, :, s.track_names.index("emotionality")].mean(1).mean()
        assert row["emotionality"] == pytest.approx(float(emo), **TOL)
        best = sorted(readout.concepts, key=lambda c: -row[f"{c}.mean"])[:2]
        assert row["top"] == ",".join(best)


def test_against_picks_the_statistics_like_read(tmp_path, files, hf, capsys):
    model, tok = hf
    readout = Readout.load(files[1])
    src = tmp_path / "in.txt"
    src.write_text("w1 w2 w3 w4\n", encoding="utf-8")
    rows = {}
    for against in ("neutral", "emotional"):
        out = tmp_path / f"{against}.jsonl"
        assert cli_here(capsys, files, "--file", str(src), "--out", str(out), "--against", against, "--smooth", "1").returncode == 0
        rows[against] = read_table(out)[0]
        s = score_text(model, tok, readout, "w1 w2 w3 w4", against=against)
        c = readout.concepts[0]
        assert rows[against][f"{c}.mean"] == pytest.approx(float(s.scores.mean(1).mean(0)[0]), **TOL)
    assert rows["neutral"] != rows["emotional"]


def test_tokens_rows_equal_token_rows(tmp_path, files, hf, capsys):
    model, tok = hf
    readout = Readout.load(files[1])
    sample = texts(5)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(sample) + "\n", encoding="utf-8")
    out = tmp_path / "tokens.csv"
    proc = cli_here(capsys, files, "--file", str(src), "--out", str(out), "--tokens", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = read_table(out)
    want = []
    for i, text in enumerate(sample):
        s = score_text(model, tok, readout, text, smooth=DEFAULT_SMOOTH)
        for j, r in enumerate(token_rows(s, readout, 3)):
            want.append((str(i), r, s.scores[j].mean(0)))
    assert len(rows) == len(want)
    for row, (ident, r, z) in zip(rows, want):
        assert row["id"] == ident and int(row["position"]) == r["position"] and row["token"] == r["token"]
        for name, v in r["tracks"].items():
            assert float(row[name]) == pytest.approx(v, abs=2e-3)  # token_rows rounds tracks to 3 places
        for k, c in enumerate(readout.concepts):
            assert float(row[c]) == pytest.approx(float(z[k]), **TOL)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_each_input_format_gives_the_same_table(tmp_path, files, fmt, capsys):
    sample = texts(6) + ['a "quoted", text w1']
    src = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        src.write_text("\n".join(sample) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        write_jsonl(src, [{"text": t} for t in sample])
    else:
        with open(src, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "source"])
            w.writerows([t, "s"] for t in sample)
    out = tmp_path / "out.jsonl"
    assert cli_here(capsys, files, "--file", str(src), "--out", str(out)).returncode == 0
    rows = read_table(out)
    assert [r["text"] for r in rows] == sample and [r["id"] for r in rows] == list(range(len(sample)))
    assert all(r["source"] == "s" for r in rows) if fmt == "csv" else "source" not in rows[0]


def test_parquet_folder_reads_as_one_table_equal_to_jsonl(tmp_path, files, capsys):
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts(9))])
    assert cli_here(capsys, files, "--file", str(src), "--out", str(tmp_path / "o.parquet"), "--batch-size", "4").returncode == 0
    assert cli_here(capsys, files, "--file", str(src), "--out", str(tmp_path / "o.jsonl"), "--batch-size", "4").returncode == 0
    assert len(list((tmp_path / "o.parquet").glob("part-*.parquet"))) == 3  # one part per batch
    got, want = pq.read_table(tmp_path / "o.parquet").to_pylist(), read_table(tmp_path / "o.jsonl")
    assert [r["id"] for r in got] == [str(r["id"]) for r in want]  # parquet's id column is text
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "id"} == pytest.approx({k: v for k, v in w.items() if k != "id"})


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_killed_mid_file_then_resumed_holds_every_id_once_with_the_uninterrupted_values(tmp_path, files, fmt, capsys):
    """The killed run is a process of its own (the crash point SIGKILLs it); the uninterrupted
    run and the resume run in this process, through the same ``main``."""
    n, batch = 1000, 50
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts(n))])
    whole, resumed = tmp_path / f"whole.{fmt}", tmp_path / f"resumed.{fmt}"
    assert cli_here(capsys, files, "--file", str(src), "--out", str(whole), "--batch-size", str(batch)).returncode == 0
    killed = cli(files, "--file", str(src), "--out", str(resumed), "--batch-size", str(batch),
                 env={crash.ENV: "read.batch_written:7"})
    assert killed.returncode == -9, killed.stderr
    part = read_table(resumed)
    assert len(part) == 7 * batch  # every batch written before the kill, whole
    if fmt != "parquet":  # a torn last row, as a kill during the write leaves it: cut on resume
        with open(resumed, "ab") as f:
            f.write(b'{"id": "d350", "te' if fmt == "jsonl" else b'd350,"w1 w2')
    proc = cli_here(capsys, files, "--file", str(src), "--out", str(resumed), "--batch-size", str(batch))
    assert proc.returncode == 0, proc.stderr
    assert f"{n - 7 * batch} texts scored, {7 * batch} already there" in proc.stderr
    got, want = read_table(resumed), read_table(whole)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want) and len({r["id"] for r in got}) == n
    by_id = {r["id"]: r for r in got}
    for w in want:
        g = by_id[w["id"]]
        for k, v in w.items():
            if isinstance(v, float) or (fmt == "csv" and k not in ("id", "text", "top")):
                assert float(g[k]) == pytest.approx(float(v), abs=1e-4), (w["id"], k)
            else:
                assert g[k] == v, (w["id"], k)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    # the tiny readout's own warning (it records no weights) may come first: one error line follows
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path, files, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "w1"}\n{"text": "w2"\n', encoding="utf-8")
    assert "bad.jsonl line 2: not JSON" in one_line_error(cli_here(capsys, files, "--file", str(bad_json), "--out", str(tmp_path / "o.csv")))
    no_text = write_jsonl(tmp_path / "no-text.jsonl", [{"text": "w1"}, {"body": "w2"}])
    assert "no-text.jsonl line 2" in one_line_error(cli_here(capsys, files, "--file", str(no_text), "--out", str(tmp_path / "o.csv")))
    no_col = tmp_path / "no-col.csv"
    no_col.write_text("body\nw1\n", encoding="utf-8")
    assert 'no "text" column' in one_line_error(cli_here(capsys, files, "--file", str(no_col), "--out", str(tmp_path / "o.csv")))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "text": "w1"}, {"id": 2, "text": "w2"}, {"id": 1, "text": "w3"}])
    msg = one_line_error(cli_here(capsys, files, "--file", str(dup), "--out", str(tmp_path / "o.csv")))
    assert "dup.jsonl line 3" in msg and "line 1" in msg
    src = write_jsonl(tmp_path / "ok.jsonl", [{"text": "w1"}])
    assert ".xlsx" in one_line_error(cli_here(capsys, files, "--file", str(tmp_path / "in.xlsx"), "--out", str(tmp_path / "o.csv")))
    assert ".tsv" in one_line_error(cli_here(capsys, files, "--file", str(src), "--out", str(tmp_path / "o.tsv")))
    assert "exactly one" in one_line_error(cli_here(capsys, files, "w1 w2", "--file", str(src), "--out", str(tmp_path / "o.csv")))
    assert "--out" in one_line_error(cli_here(capsys, files, "--file", str(src)))
    assert not (tmp_path / "o.csv").exists()  # nothing written by a refused run


def test_an_out_of_another_table_is_refused_not_mixed(tmp_path, files, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(3)])
    out = tmp_path / "o.jsonl"
    assert cli_here(capsys, files, "--file", str(src), "--out", str(out)).returncode == 0
    before = out.read_bytes()
    assert "another table" in one_line_error(cli_here(capsys, files, "--file", str(src), "--out", str(out), "--tokens"))
    assert out.read_bytes() == before


def test_empty_text_has_null_statistics(tmp_path, files, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": "w1 w2"}])
    out = tmp_path / "o.jsonl"
    assert cli_here(capsys, files, "--file", str(src), "--out", str(out)).returncode == 0
    empty, full = read_table(out)
    assert empty["n_tokens"] == 0 and empty["top"] == "" and all(v is None for k, v in empty.items() if k.endswith(".mean"))
    assert all(isinstance(v, float) and math.isfinite(v) for k, v in full.items() if k.endswith(".mean"))


def test_missing_pyarrow_says_how_to_install(tmp_path, files):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pyarrow").mkdir()
    (blocker / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "w1"}])
    proc = cli(files, "--file", str(src), "--out", str(tmp_path / "o.parquet"),
               env={"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])})
    assert "pip install 'amygdala[tables]'" in one_line_error(proc)


def test_batched_scores_match_unbatched_forwards(files, hf):
    """The library path directly: padding a batch changes no text's scores."""
    from amygdala.readout.dataset import Item, score_rows

    model, tok = hf
    readout = Readout.load(files[1])
    items = [Item(i, t, i + 1) for i, t in enumerate(texts(7))]
    rows = [r for _, batch in score_rows(model, tok, readout, items, smooth=1, tokens=True, batch_size=7) for r in batch]
    want = [s.scores[j].mean(0) for it in items for s in [score_text(model, tok, readout, it.text)] for j in range(len(s.tokens))]
    got = torch.tensor([[r[c] for c in readout.concepts] for r in rows])
    assert torch.allclose(got, torch.stack(want), atol=1e-4)
