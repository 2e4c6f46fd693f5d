"""Sample, prompt and note files from strangers (issue 24): every one reads back what was written,
and a malformed one is one SampleError, never a traceback nor a quadratic parse."""

from __future__ import annotations

import signal

import pytest

from amygdala.teach.convert import parse_tags
from amygdala.teach.runs import read_prompts
from amygdala.teach.samples import SampleError, TeachSample, read_samples, write_samples


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085", "\x1c", "\x0b", "\x0c"])
def test_a_sample_holding_a_unicode_line_separator_reads_back(tmp_path, sep):
    sample = TeachSample((("user", f"one{sep}two"),), f"calm{sep}ly", scores={"calm": 0.5}, source="s")
    path = tmp_path / "s.jsonl"
    write_samples(path, [sample])
    assert read_samples(path) == [sample]


def test_crlf_lines_still_read(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"context": "hi", "chosen": "yes"}\r\n\r\n{"context": "a", "chosen": "b"}\r\n')
    assert [s.chosen for s in read_samples(path)] == ["yes", "b"]


def test_a_prompt_line_holding_u2028_is_one_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\u2028still first\nsecond\n", encoding="utf-8")
    assert read_prompts(path) == ["first\u2028still first", "second"]


@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000])
def test_deeply_nested_json_is_one_sample_error(tmp_path, body):
    path = tmp_path / "s.jsonl"
    path.write_text(body + "\n", encoding="utf-8")
    with pytest.raises(SampleError, match="nested too deeply"):
        read_samples(path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(SampleError, match="nested too deeply"):
        read_prompts(prompts)


def test_tag_lines_parse_as_before():
    assert parse_tags("calm: 0.8\n  sad_ness :-1e-2 \nwide eyed:.5", "w") == {"calm": 0.8, "sad_ness": -0.01, "wide eyed": 0.5}
    for bad in ["calm 0.8", ": 1", "1calm: 2", "calm: x", "calm: 1e999", "a: 1: 2"]:
        with pytest.raises(SampleError):
            parse_tags(bad, "w")


def _alarm(signum, frame):
    raise TimeoutError("the tag parse ran for 30 s: it is not linear in the line's length")


def test_a_tag_line_of_long_space_runs_is_refused_at_once():
    """'a', 200k spaces, ':', 200k spaces, 'x': the old pattern backtracked quadratically (2.4 s at 8k
    spaces, minutes here). The 30 s alarm only stops a regressed parse from hanging the suite."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        with pytest.raises(SampleError, match="expected 'concept: number'"):
            parse_tags("a" + " " * 200_000 + ":" + " " * 200_000 + "x", "w")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
