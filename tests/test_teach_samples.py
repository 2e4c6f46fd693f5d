"""The teach loop without a server: the sample format, the converters, tokenization, the CLI's
checks before anything is sent, and snapshot/rollback in the training service (seconds)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from helpers import tiny
from amygdala.cli.main import main
from amygdala.teach import convert
from amygdala.teach.samples import SampleError, TeachSample, read_samples, write_samples
from amygdala.teach.tokens import Encoder

MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I failed the test."}]


def jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# --------------------------------------------------------------------------- the format
def test_samples_round_trip_through_the_file(tmp_path):
    samples = [
        TeachSample("Tell me a story.", "Once upon a time.", source="hand"),
        TeachSample(tuple((m["role"], m["content"]) for m in MESSAGES), "That is hard; what happened?",
                    "Study more.", {"calm": 0.8, "sad": -1.5}, "log:3"),
    ]
    path = tmp_path / "s.jsonl"
    assert write_samples(path, samples) == 2
    assert read_samples(path) == samples
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"v": 1, "context": "Tell me a story.", "chosen": "Once upon a time.", "source": "hand"}
    path.write_text(path.read_text().replace('"v": 1, ', ""))  # no version: read as version 1
    assert read_samples(path) == samples


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not JSON"),
    ('["context"]', ":2: expected a JSON object"),
    ('{"context": "a"}', ":2: field 'chosen': missing"),
    ('{"context": "a", "chosen": ""}', ":2: field 'chosen': expected a non-empty string"),
    ('{"context": "a", "chosen": "b", "rejected": 3}', ":2: field 'rejected': expected a non-empty string"),
    ('{"context": "", "chosen": "b"}', ":2: field 'context': empty"),
    ('{"context": [{"role": "robot", "content": "x"}], "chosen": "b"}', ":2: field 'context'[0].role: 'robot'"),
    ('{"context": [], "chosen": "b"}', ":2: field 'context': no messages"),
    ('{"context": "a", "chosen": "b", "scores": {"calm": "high"}}', ":2: field 'scores'.calm: 'high' is not a finite"),
    ('{"context": "a", "chosen": "b", "scores": {"calm": NaN}}', ":2: field 'scores'.calm: nan is not a finite"),
    ('{"context": "a", "chosen": "b", "v": 2}', ":2: field 'v': version 2"),
    ('{"context": "a", "chosen": "b", "prompt": "x"}', ":2: field 'prompt': unknown"),
])
def test_a_bad_line_is_one_error_naming_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    jsonl(path, [{"context": "ok", "chosen": "fine"}, line, {"context": "ok", "chosen": "also fine"}])
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}{message}") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- transcripts
def test_transcripts_every_assistant_turn_regenerations_and_corrections(tmp_path):
    path = tmp_path / "chats.jsonl"
    base = MESSAGES + [{"role": "assistant", "content": "Study more."}]
    jsonl(path, [
        {"messages": base + [{"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Any time."}]},
        # the same conversation, first answer regenerated: the later version is chosen
        {"messages": MESSAGES + [{"role": "assistant", "content": "That is hard. What happened?"}]},
        # a correction: the user's #correction turn replaces the assistant's answer
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "WHAT."},
                      {"role": "user", "content": "#correction\nHello! How can I help?"},
                      {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]},
    ])
    samples = convert.transcripts_to_samples(path)
    ctx = tuple((m["role"], m["content"]) for m in MESSAGES)
    assert TeachSample(ctx, "That is hard. What happened?", "Study more.", source="chats.jsonl:regenerated") in samples
    assert TeachSample(ctx + (("assistant", "Study more."), ("user", "Thanks.")), "Any time.", source="chats.jsonl") in samples
    assert TeachSample((("user", "Hi"),), "Hello! How can I help?", "WHAT.", source="chats.jsonl:3:correction") in samples
    later = (("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Weather?"))
    assert TeachSample(later, "Sunny.", source="chats.jsonl") in samples  # sees the corrected answer, not the marker
    assert len(samples) == 4  # "WHAT." is no single-turn sample; the regenerated context is one pair
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "transcripts", str(path), "--out", str(out)]) == 0
    assert read_samples(out) == samples


@pytest.mark.parametrize("row, message", [
    ({"conversation": []}, ":1: field 'messages': missing"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, ":1: field 'messages[0]': an assistant turn with no turn"),
    ({"messages": [{"role": "user", "content": "#correction\nx"}]}, ":1: field 'messages[0]': a #correction turn must follow"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "#correction"}]}, ":1: field 'messages[2].content': #correction with no"),
    ({"messages": [{"role": "user", "content": 5}]}, ":1: field 'messages'[0].content: expected a string"),
])
def test_bad_transcripts_name_the_line_and_nothing_is_written(tmp_path, capsys, row, message):
    path, out = tmp_path / "chats.jsonl", tmp_path / "out.jsonl"
    jsonl(path, [row])
    assert main(["pairs", "transcripts", str(path), "--out", str(out)]) == 2
    assert f"error: {path}{message}" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- scored notes
def test_notes_thresholds_select_sft_data_from_scores_and_tag_lines(tmp_path, capsys):
    path, out = tmp_path / "notes.jsonl", tmp_path / "sft.jsonl"
    jsonl(path, [
        {"text": "A quiet walk by the lake.", "tags": "calm: 0.9\nanxious: 0.1"},
        {"text": "The deadline moved up again.", "scores": {"calm": 0.2, "anxious": 0.9}},
        {"text": "Tea and a book.", "tags": ["calm: 0.75", "anxious: 0.3"], "context": "How was your evening?"},
        {"text": "Calm but worried.", "scores": {"calm": 0.8, "anxious": 0.6}},
        {"text": "Nobody tagged this one."},
    ])
    assert main(["pairs", "notes", str(path), "--out", str(out), "--min", "calm=0.7", "--max", "anxious=0.5"]) == 0
    err = capsys.readouterr().err
    assert "notes 5, selected 2, below threshold 2, unscored 1" in err
    got = read_samples(out)
    assert [(s.context, s.chosen, s.scores) for s in got] == [
        ("Write a short note about your day.", "A quiet walk by the lake.", {"anxious": 0.1, "calm": 0.9}),
        ("How was your evening?", "Tea and a book.", {"anxious": 0.3, "calm": 0.75}),
    ]
    assert [s.source for s in got] == ["notes.jsonl:1", "notes.jsonl:3"]


def test_a_scorer_fills_missing_scores_and_the_notes_own_win():
    notes = [convert.Note("c", "untagged calm text", {}, "f:1"), convert.Note("c", "tagged", {"calm": 0.1, "anxious": 0.2}, "f:2"),
             convert.Note("c", "half", {"anxious": 0.0}, "f:3")]
    seen = []

    def scorer(texts):
        seen.extend(texts)
        return [{"calm": 0.9, "anxious": 0.9} for _ in texts]

    samples, counts = convert.notes_to_samples(notes, convert.Thresholds({"calm": 0.5}, {"anxious": 0.5}), scorer)
    assert seen == ["untagged calm text", "half"]  # only the notes missing a thresholded concept are scored
    assert [s.chosen for s in samples] == ["half"]  # its own anxious 0.0 wins over the scorer's 0.9
    assert counts == {"notes": 3, "selected": 1, "below_threshold": 2, "unscored": 0, "scored_by_readout": 2}


def test_local_readout_scores_notes_nobody_tagged(planted, tmp_path, capsys):
    """The planted model's alpha words read high on alpha (built here from its corpus), filler words low."""
    model, corpus, _ = planted
    assert main(["build", "--model", str(model), "--corpus", str(corpus), "--layers", "2", "--out", str(tmp_path / "r"),
                 "--quiet", "--min-positives", "1"]) == 0
    notes = tmp_path / "notes.jsonl"
    words = tiny.CONCEPT_WORDS["alpha"]
    jsonl(notes, [{"text": " ".join(words[:6])}, {"text": " ".join(tiny.COMMON[:6])}])
    out = tmp_path / "sft.jsonl"
    assert main(["pairs", "notes", str(notes), "--out", str(out), "--min", "alpha=1.0", "--score-readout",
                 str(tmp_path / "r"), "--model", str(model)]) == 0
    assert [s.chosen for s in read_samples(out)] == [" ".join(words[:6])]
    assert "scored by readout 2" in capsys.readouterr().err


@pytest.mark.parametrize("tags, message", [
    ("calm 0.8", "line 'calm 0.8': expected 'concept: number'"),
    ("calm: high", "line 'calm: high'"),
    (7, "expected tag lines"),
])
def test_bad_tag_lines_name_the_line(tmp_path, tags, message):
    path = tmp_path / "notes.jsonl"
    jsonl(path, [{"text": "fine", "tags": "calm: 1"}, {"text": "x", "tags": tags}])
    with pytest.raises(SampleError, match=rf"^{path}:2: field 'tags'.*{message}"):
        convert.read_notes(path, "c")


# --------------------------------------------------------------------------- tokens and the CLI's checks
def test_encoder_raw_text_and_chat_template(tmp_path):
    path = tmp_path / "tok"
    tok = tiny.make_tokenizer(path)  # ChatML template, like SmolLM2's
    raw = Encoder.load(path, raw=True)
    sample = raw.sample(TeachSample("w1 w2", "w3 w4", "w5"), "orpo", "f:1")
    assert sample == {"context_ids": tok("w1 w2")["input_ids"], "continuation_ids": tok.convert_tokens_to_ids(["w3", "w4"]),
                      "rejected_ids": tok.convert_tokens_to_ids(["w5"])}
    with pytest.raises(SampleError, match="^f:1: field 'rejected': missing; objective dpo"):
        raw.sample(TeachSample("w1", "w3"), "dpo", "f:1")
    with pytest.raises(SampleError, match="^f:2: chat messages, but the tokenizer has no chat template"):
        raw.sample(TeachSample((("user", "w1"),), "w3"), "sft", "f:2")
    chat = Encoder.load(path)
    ids = chat.sample(TeachSample("w1", "w3"), "sft", "f:1")  # text context: the user's turn
    assert ids["context_ids"] == tok.apply_chat_template([{"role": "user", "content": "w1"}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"]
    assert ids["continuation_ids"] == [tok.convert_tokens_to_ids("w3"), tok.eos_token_id]  # the end of turn is learned
    too_long = TeachSample("w1 " * 300, "w3")
    chat.max_length = 256
    with pytest.raises(SampleError, match="^f:3: field 'context': 3.. tokens with the chosen, over the model's 256"):
        chat.sample(too_long, "sft", "f:3")


def test_teach_checks_the_whole_file_before_it_contacts_the_server(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    jsonl(data, [{"context": "a", "chosen": "b"}, {"context": "a", "chosen": "b", "scores": []}])
    # port 9 (discard) has no server: the file's error comes first, so nothing could have been sent
    assert main(["teach", "--server", "http://127.0.0.1:9", "--data", str(data), "--api-key", "k"]) == 2
    assert f"error: {data}:2: field 'scores': expected an object" in capsys.readouterr().err
    tiny.make_tokenizer(tmp_path / "tok")
    jsonl(data, ["", {"context": "w1", "chosen": "w2"}])  # line 2 (line 1 is blank): no rejected, which orpo needs
    assert main(["teach", "--server", "http://127.0.0.1:9", "--data", str(data), "--api-key", "k", "--objective", "orpo",
                 "--tokenizer", str(tmp_path / "tok")]) == 2
    assert f"error: {data}:2: field 'rejected': missing; objective orpo" in capsys.readouterr().err
    assert main(["dream", "--server", "http://127.0.0.1:9", "--prompts", str(data), "--toward", "calm=x"]) == 2
    assert "--toward 'calm=x': 'x' is not a number" in capsys.readouterr().err
    assert main(["rollback", "--server", "http://127.0.0.1:9", "--snapshot", "snap-1", "--api-key", "k"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


# --------------------------------------------------------------------------- snapshot / rollback in the worker
def test_snapshot_and_rollback_restore_the_weights_and_moments_bit_for_bit(tmp_path, one_thread):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from amygdala.checkpoint import layout
    from amygdala.finetune import protocol, shared_weights
    from amygdala.finetune.trainer import Trainer
    from amygdala.finetune.service import TrainingService
    from amygdala.finetune.worker import handle

    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    model = shared_weights.view_model(AutoConfig.from_pretrained(folder), served)
    resets = []
    svc = TrainingService(Trainer(model, folder, served=served), sync_delay=3600, reset_cache=lambda: (resets.append(1) or True, None))
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    thread.start()
    replies: list[dict] = []

    def ask(message):
        n = len(replies)
        reply = handle(svc, message, replies.append)
        if reply is not None:
            return reply
        deadline = time.monotonic() + 60
        while len(replies) == n and time.monotonic() < deadline:
            time.sleep(0.01)
        return replies[-1]

    def train(steps):
        svc.submit({"samples": [{"context_ids": [2, 10, 11], "continuation_ids": [40, 41, 42]}],
                    "config": {"learning_rate": 1e-2, "steps": steps}})
        while len(svc.status()["finished"]) < jobs[0] + 1:
            time.sleep(0.02)
        jobs[0] += 1

    try:
        jobs = [0]
        train(3)  # moments exist before the snapshot, so restoring them is checked too
        before = {n: t.clone() for n, t in served.items()}
        moments = {k: v.clone() for k, v in svc.trainer.optimizer.state_dict()["state"][0].items() if torch.is_tensor(v)}
        snap = ask(protocol.request(protocol.SNAPSHOT))
        assert snap["ok"] and snap["snapshot"]["tensors"] == len(svc.trainer.names)
        train(5)
        assert any(not torch.equal(before[n], t) for n, t in served.items())
        bad = ask(protocol.request(protocol.ROLLBACK, snapshot="snap-other"))
        assert not bad["ok"] and bad["error"]["field"] == "snapshot" and "holds " + snap["snapshot"]["snapshot"] in bad["error"]["message"]
        assert handle(svc, protocol.request(protocol.ROLLBACK), replies.append)["error"]["field"] == "snapshot"
        resets.clear()
        done = ask(protocol.request(protocol.ROLLBACK, snapshot=snap["snapshot"]["snapshot"]))
        assert done["ok"] and done["rollback"]["tensors_restored"] > 0 and resets == [1]
        assert all(torch.equal(before[n], t) for n, t in served.items())  # bit for bit, in the served storage
        state = svc.trainer.optimizer.state_dict()["state"][0]
        assert all(torch.equal(state[k], v) for k, v in moments.items())
        assert svc.status()["sync"]["unsynced_changes"]
    finally:
        stop.set()
        thread.join(10)
