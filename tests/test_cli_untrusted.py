"""The training key and the remote-training refusal against what a stranger controls (issue 24):
pass-through flags, a redirecting server, the process list."""

from __future__ import annotations

import argparse
import http.server
import threading

import pytest

from amygdala import AmygdalaError
from amygdala.cli.teach import _api_key
from amygdala.serve.launch import passed_host, vllm_argv
from amygdala.teach.client import Server, ServerError
from amygdala.view import asset


@pytest.mark.parametrize("extra", [["--", "--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--", "--hos", "::"],
                                   ["--host", "127.0.0.1", "--", "--host", "10.0.0.1"]])
def test_a_pass_through_host_is_refused_like_our_own(monkeypatch, extra):
    monkeypatch.setenv("AMYGDALA_API_KEY", "x")
    args = argparse.Namespace(model="default", readout=None, host="127.0.0.1", port=8000, allow_remote_training=False,
                              vllm_args=extra, no_page=False)
    with pytest.raises(AmygdalaError, match="reachable from the network"):
        vllm_argv(args)


def test_the_last_host_wins_as_in_vllm():
    assert passed_host(["--host", "0.0.0.0", "--host=127.0.0.1"], "::") == "127.0.0.1"
    assert passed_host(["--port", "1"], "127.0.0.1") == "127.0.0.1"


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    location = ""

    def do_POST(self):  # noqa: N802 (http.server's name)
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.location:
            self.send_response(307)
            self.send_header("Location", self.location)
            self.end_headers()
        else:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *a):
        pass


def _serve(handler) -> http.server.HTTPServer:
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_the_client_does_not_carry_the_key_across_a_redirect():
    elsewhere = _serve(type("Elsewhere", (_Recorder,), {"seen": [], "location": ""}))
    here = _serve(type("Here", (_Recorder,), {"seen": [], "location": f"http://localhost:{elsewhere.server_port}/x"}))
    try:
        with pytest.raises(ServerError, match="another origin"):
            Server(f"http://127.0.0.1:{here.server_port}", api_key="secret").call("POST", "/train", {}, auth=True)
        assert here.RequestHandlerClass.seen == [("/train", "Bearer secret")]
        assert elsewhere.RequestHandlerClass.seen == []
    finally:
        here.shutdown()
        elsewhere.shutdown()


def test_a_same_origin_redirect_is_still_followed():
    here = _serve(type("Here", (_Recorder,), {"seen": [], "location": ""}))
    try:
        here.RequestHandlerClass.location = ""
        assert Server(f"http://127.0.0.1:{here.server_port}", api_key="k").call("POST", "/train", {}, auth=True) == {"ok": True}
    finally:
        here.shutdown()


def test_the_key_comes_from_a_file_and_argv_warns(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert _api_key(argparse.Namespace(api_key_file=key, api_key=None)) == "s3cret"
    assert _api_key(argparse.Namespace(api_key_file=None, api_key=None)) is None  # then $AMYGDALA_API_KEY
    assert _api_key(argparse.Namespace(api_key_file=None, api_key="k")) == "k"
    assert "shows the key to every user" in capsys.readouterr().err
    key.write_text("")
    with pytest.raises(AmygdalaError, match="empty"):
        _api_key(argparse.Namespace(api_key_file=key, api_key=None))


def test_the_page_reads_the_key_from_the_fragment_and_clears_it():
    js = asset("app.js").decode()
    assert 'location.search).get("key")' not in js  # a query string lands in the server's access log
    assert "location.hash" in js and "history.replaceState" in js
