"""The readers of outside input, each as ``read(data: bytes, folder: Path)``, with seed files made from
real writers: shared by the fuzz test (tests/test_fuzz_readers.py, short) and bench/fuzz.py (long).

Allowed outcomes: a parsed value or an :class:`amygdala.AmygdalaError` (the project's own error
types all derive from it). Anything else, a run past :data:`TIME_S` or a traced peak past
:data:`MEMORY_BYTES` is a failure. Bounds are in-process: a ``setitimer`` alarm per input and a
``tracemalloc`` peak per input (Python and numpy allocations; a measure checked after each input,
not an OS cap: RLIMIT_AS cannot be used in a process that has imported torch).
"""

from __future__ import annotations

import json
import shutil
import signal
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

from amygdala import AmygdalaError

TIME_S = 2.0
MEMORY_BYTES = 512 << 20
ROOT = Path(__file__).resolve().parents[2]


class Hang(Exception):
    """An input ran past TIME_S."""


class TooMuchMemory(Exception):
    """An input's traced peak passed MEMORY_BYTES."""


def _alarm(signum, frame):
    raise Hang(f"ran past {TIME_S} s")


def bounded(read: Callable[[bytes, Path], object], data: bytes, folder: Path) -> str:
    """``"ok"`` or ``"refused"`` (an AmygdalaError); raises Hang, TooMuchMemory or the reader's other error."""
    old = signal.signal(signal.SIGALRM, _alarm)
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, TIME_S)
    try:
        read(data, folder)
        outcome = "ok"
    except AmygdalaError:
        outcome = "refused"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        if not started:
            tracemalloc.stop()
    if peak > MEMORY_BYTES:
        raise TooMuchMemory(f"traced peak {peak} bytes")
    return outcome


# --------------------------------------------------------------------------- readers
def _file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def read_vector_file(data: bytes, folder: Path):
    from amygdala.interop import read_vectors

    return read_vectors(_file(folder, "v.bin", data))


def _readout_with(folder: Path, name: str, data: bytes):
    """The seed readout copied afresh with its file ``name`` replaced by ``data``, loaded."""
    from amygdala.readout import Readout

    out = folder / "readout"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder / "readout-seed", out)
    (out / name).write_bytes(data)
    return Readout.load(out)


def read_readout_json(data: bytes, folder: Path):
    return _readout_with(folder, "readout.json", data)


def read_readout_tensors(data: bytes, folder: Path):
    return _readout_with(folder, "readout.safetensors", data)


def read_manifest(data: bytes, folder: Path):
    from amygdala.corpus.loader import _read_manifest

    return _read_manifest(_file(folder, "manifest.toml", data))


def read_story(data: bytes, folder: Path):
    from amygdala.corpus.loader import parse_paragraphs

    return parse_paragraphs(_file(folder, "story.txt", data))


def read_samples_file(data: bytes, folder: Path):
    from amygdala.teach.samples import read_samples

    return read_samples(_file(folder, "s.jsonl", data))


def read_transcripts(data: bytes, folder: Path):
    from amygdala.teach.convert import transcripts_to_samples

    return transcripts_to_samples(_file(folder, "t.jsonl", data))


def read_notes_file(data: bytes, folder: Path):
    from amygdala.teach.convert import read_notes

    return read_notes(_file(folder, "n.jsonl", data), "a default context")


def read_prompts_file(data: bytes, folder: Path):
    from amygdala.teach.runs import read_prompts

    return read_prompts(_file(folder, "p.txt", data))


def replay_journal(data: bytes, folder: Path):
    """The journal replayed onto a fresh copy of a tiny model folder; nothing outside it may change."""
    from amygdala import checkpoint

    model = folder / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(folder / "model-seed", model)
    (model / checkpoint.JOURNAL).write_bytes(data)
    before = sorted(p.name for p in folder.iterdir())
    try:
        return checkpoint.recover(model, wait=0)
    finally:
        after = sorted(p.name for p in folder.iterdir())
        if after != before:
            raise AssertionError(f"replay changed the folder around the model: {before} -> {after}")


def train_body(data: bytes, folder: Path):
    from amygdala.finetune.inputs import Limits
    from amygdala.serve.finetune_routes import _checked_submit

    return _checked_submit(data, Limits(vocab_size=256, max_length=64))


def rollback_body(data: bytes, folder: Path):
    from amygdala.fields import FieldError
    from amygdala.serve.finetune_routes import json_body

    body = json_body(data, '{"snapshot": "snap-..."}')
    if not isinstance(body, dict) or not isinstance(body.get("snapshot"), str):
        raise FieldError("snapshot", "expected a string")
    return body


def completion_body(data: bytes, folder: Path):
    """A completion request's amygdala fields (``steer``, ``readout``...) through the spec parser."""
    from amygdala.fields import FieldError
    from amygdala.readout import Readout
    from amygdala.serve.spec import ModelShape, parse

    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # vLLM's own parser refuses these before amygdala sees the body
        raise FieldError("body", "not JSON") from None
    if not isinstance(body, dict):
        raise FieldError("body", "not an object")
    xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else None
    return parse(body, xargs, Readout.load(folder / "readout-seed"), ModelShape(4, 8))


READERS: dict[str, Callable[[bytes, Path], object]] = {
    "gguf": read_vector_file, "pickle": read_vector_file, "zip": read_vector_file,
    "readout.json": read_readout_json, "readout.safetensors": read_readout_tensors,
    "manifest": read_manifest, "story": read_story, "samples": read_samples_file, "transcripts": read_transcripts,
    "notes": read_notes_file, "prompts": read_prompts_file, "journal": replay_journal, "train": train_body,
    "rollback": rollback_body, "completion": completion_body,
}


# --------------------------------------------------------------------------- inputs
_MAGIC = [b"\xff\xff\xff\xff", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\x09\x00\x00\x00",
          b"[" * 64, b'{"a":' * 20, "\u2028".encode(), b"\r", b"\n", b":", b"\x80\x02", b"../../x"]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few edits (byte flips, inserts, deletes, truncation, big integers), or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            data[at:at] = draw(st.one_of(st.binary(max_size=16), st.sampled_from(_MAGIC)))
        elif op == 2:
            del data[at:at + draw(st.integers(1, 64))]
        elif op == 3:
            data = data[:at]
        else:
            magic = draw(st.sampled_from(_MAGIC))
            data[at:at + len(magic)] = magic
    return bytes(data)


# --------------------------------------------------------------------------- seeds
def make_seeds(folder: Path) -> dict[str, list[bytes]]:
    """Real files from the project's own writers (and the bundled corpus), per reader; also leaves
    ``readout-seed`` and ``model-seed`` in ``folder`` for the readers that need a folder."""
    from helpers import tiny
    from amygdala import checkpoint
    from amygdala.checkpoint import layout
    from amygdala.interop import LayerVectors, pickles, write_vectors
    from amygdala.readout import Readout
    from amygdala.teach.samples import TeachSample, write_samples
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    vectors = LayerVectors({1: torch.linspace(-1, 1, 8), 2: torch.ones(8)}, "llama", {"concepts": {"calm": 1}})
    gguf = write_vectors(vectors, folder / "s.gguf", "gguf").read_bytes()
    sv = write_vectors(vectors, folder / "s.pt", "steering-vectors").read_bytes()
    repeng_state = {"model_type": "llama", "directions": {1: np.ones(8, dtype=np.float32)}}
    obj = pickles.RepengControlVector.__new__(pickles.RepengControlVector)
    obj.__dict__.update(repeng_state)
    import io
    buf = io.BytesIO()
    pickles._NamedPickler(buf, protocol=4).dump(obj)
    repeng = buf.getvalue()
    torch.save({1: torch.ones(8)}, folder / "d.pt")
    plain_dict_zip = (folder / "d.pt").read_bytes()

    g = torch.Generator().manual_seed(0)
    layers = [1, 2]
    vecs = {l: torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1) for l in layers}
    readout = folder / "readout-seed"
    Readout(["a", "b", "c"], layers, vecs, {l: torch.zeros(3) for l in layers}, {l: torch.ones(3) for l in layers},
            meta={"method": "diffmean"}).save(readout)

    corpus = ROOT / "amygdala" / "corpus" / "bundled"
    stories = [p.read_bytes() for p in sorted((corpus / "stories").glob("*.txt"))[:3]]

    samples = folder / "s.jsonl"
    write_samples(samples, [TeachSample((("user", "hi\u2028there"),), "calm", scores={"calm": 0.5}, source="s"),
                            TeachSample("a", "b", "c")])
    transcripts = (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
                   b'{"role": "user", "content": "no, say z"}]}\n')
    notes = (b'{"context": "hi", "text": "calm words", "tags": "calm: 0.8\\nsad: -0.2"}\n'
             b'{"text": "plain", "tags": ["calm: 1"]}\n')

    model = folder / "model-seed"
    tiny.make_model("llama", model)
    weights = model / "model.safetensors"
    served = layout.to_served({k: v.clone() for k, v in load_file(weights).items()})
    served["model.norm.weight"] += 1
    entries = checkpoint.read_entries(model)
    writer = checkpoint._JournalWriter(model / "j.tmp")
    blocks = checkpoint._Blocks(writer.block)
    for mm, e, name, new, changed in checkpoint._changes(model, checkpoint.checkpoint_views(model, served, entries), entries):
        blocks.add(mm, e, new, changed)
    blocks.flush()
    writer.rename("amygdala-optimizer.pt.amygdala-tmp", "amygdala-optimizer.pt")
    writer.close()
    journal = (model / "j.tmp").read_bytes()
    (model / "j.tmp").unlink()

    train = json.dumps({"samples": [{"context_ids": [1, 2, 3], "continuation_ids": [4, 5]}],
                        "config": {"objective": "sft", "steps": 1}}).encode()
    return {
        "gguf": [gguf], "pickle": [repeng], "zip": [sv, plain_dict_zip],
        "readout.json": [(readout / "readout.json").read_bytes()],
        "readout.safetensors": [(readout / "readout.safetensors").read_bytes()],
        "manifest": [(corpus / "manifest.toml").read_bytes()], "story": stories,
        "samples": [samples.read_bytes()], "transcripts": [transcripts], "notes": [notes],
        "prompts": [b'hello\n[{"role": "user", "content": "hi"}]\n'], "journal": [journal],
        "train": [train], "rollback": [b'{"snapshot": "snap-1"}'],
        "completion": [json.dumps({"steer": [{"concept": "a", "strength": 2, "layers": [1]}], "readout": "raw"}).encode(),
                       json.dumps({"vllm_xargs": {"steer": '[{"concept": "b", "strength": -1}]'}}).encode()],
    }


__all__ = ["READERS", "Hang", "TooMuchMemory", "bounded", "make_seeds", "mutated"]
