"""The teach commands' anchored-objective flags (--anchor, --anchor-texts, --dpop-lambda,
--holdout, --patience): a bad one is exit 2 naming the flag before anything is sent, and the
good ones reach every /train body's config (the body the client puts on the wire, read back by
a plain HTTP listener: what the server would receive)."""

from __future__ import annotations

import json
import threading
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from helpers import tiny
from amygdala import AmygdalaError
from amygdala.cli.main import main
from amygdala.cli.teach import _train_options
from amygdala.teach.client import Server
from amygdala.teach.tokens import Encoder


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"context": "w1", "chosen": "w2", "rejected": "w3"}) + "\n")
    tiny.make_tokenizer(tmp_path / "tok")
    return path


@pytest.mark.parametrize("flags,message", [
    (["--anchor", "-1"], r"--anchor: -1(\.0)? must be a number in \[0, 100\]"),
    (["--holdout", "1"], r"--holdout: 1(\.0)? must be a number in \[0, 1\)"),
    (["--patience", "0"], r"--patience: 0 must be an integer in 1\.\.100"),
    (["--dpop-lambda", "nan"], r"--dpop-lambda: nan must be a number"),
    (["--anchor-texts", "TEXTS"], r"config\.neutral: only the anchor uses it"),
])
def test_a_bad_flag_is_exit_2_naming_it_before_anything_is_sent(data, tmp_path, capsys, flags, message):
    import re

    texts = tmp_path / "neutral.txt"
    texts.write_text("w1 w2 w3\n\nw4 w5\n")
    flags = [str(texts) if f == "TEXTS" else f for f in flags]
    # port 9 (discard) has no server: an error about reaching it would mean something was sent
    code = main(["teach", "--server", "http://127.0.0.1:9", "--data", str(data), "--api-key", "k",
                 "--tokenizer", str(tmp_path / "tok"), "--objective", "dpop", *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert "cannot reach" not in err


def _args(**given) -> Namespace:
    base = dict(anchor=None, anchor_texts=None, dpop_lambda=None, holdout=None, patience=None)
    return Namespace(**{**base, **given})


def test_only_the_given_flags_become_settings_and_texts_become_token_ids(tmp_path):
    tiny.make_tokenizer(tmp_path / "tok")
    encoder = Encoder.load(tmp_path / "tok", raw=True)
    assert _train_options(_args(), encoder) == {}  # nothing given: the server's defaults
    texts = tmp_path / "neutral.txt"
    texts.write_text("w1 w2 w3\n\nw4 w5\n")
    options = _train_options(_args(anchor=0.5, anchor_texts=texts, holdout=0.2, patience=3), encoder)
    assert options == {"anchor": 0.5, "holdout": 0.2, "patience": 3,
                       "neutral": [encoder.tokenizer(t)["input_ids"] for t in ("w1 w2 w3", "w4 w5")]}
    with pytest.raises(AmygdalaError, match=r"--anchor-texts .*missing.txt: cannot read it"):
        _train_options(_args(anchor=1.0, anchor_texts=tmp_path / "missing.txt"), encoder)


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        out = json.dumps({"job_id": "job-1", "state": "queued", "ahead": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):  # quiet
        pass


def test_the_options_join_every_train_body_config():
    httpd = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        server = Server(f"http://127.0.0.1:{httpd.server_address[1]}", api_key="k")
        body = {"samples": [{"context_ids": [2], "continuation_ids": [3]}], "config": {"objective": "orpo", "steps": 3}}
        server.train(body)
        server.train_options = {"anchor": 0.5, "holdout": 0.2}
        server.train(body)
        server.train({"samples": body["samples"]})
    finally:
        httpd.shutdown()
        thread.join(10)
    first, second, third = _Recorder.bodies[-3:]
    assert first == body
    assert second == {**body, "config": {"objective": "orpo", "steps": 3, "anchor": 0.5, "holdout": 0.2}}
    assert third["config"] == {"anchor": 0.5, "holdout": 0.2}
    assert body["config"] == {"objective": "orpo", "steps": 3}  # the caller's body is not changed
