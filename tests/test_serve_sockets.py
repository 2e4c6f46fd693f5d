"""The server's sockets and network exposure without vLLM: the scores loop survives malformed
messages, every socket lives in a private folder, and the training routes are not put on the
network by accident.

Formerly part of tests/test_hardening.py (issue 14).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import tiny
from helpers.training import KEY
from amygdala.cli.main import main as cli


def test_the_scores_loop_survives_malformed_messages(tmp_path):
    from amygdala.serve import channel

    address = f"ipc://{tmp_path / 'scores.sock'}"
    got: list[tuple] = []
    rows = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    good = channel.encode(["t1", "t1"], ["r1", "r1"], [0, 1], rows, [0])
    garbage = [
        [b"only one frame"], [b"not json", b""], [b"[1, 2]", b""], [b'{"t": 1, "r": 2, "k": 3, "shape": [1]}', b"\0" * 4],
        [json.dumps({"t": ["a"], "r": ["b"], "k": [0], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": ["a", "b"], "r": ["b"], "k": [0, 1], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": [["a"], "b"], "r": ["b", "c"], "k": [0, 1], "shape": [2, 1, 3]}).encode(), rows.tobytes()],
        [json.dumps({"t": ["a"], "r": ["b"], "k": [0], "shape": [1, 5]}).encode(), b"\0" * 3], good + [b"extra"],
    ]

    async def run() -> int:
        receiver = channel.Receiver(address, lambda *a: got.append(a))
        receiver.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(address)
        for frames in garbage:
            push.send_multipart(frames)
        push.send_multipart(good)
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        push.close(0)
        receiver.close()
        return receiver.bad_messages

    bad = asyncio.run(run())
    assert bad == len(garbage)
    assert [(t, r, k, layers) for t, r, k, _, layers in got] == [("t1", "r1", 0, [0]), ("t1", "r1", 1, [0])]
    assert np.array_equal(got[1][3], rows[1])


def test_every_socket_lives_in_a_private_runtime_folder(monkeypatch, tmp_path):
    from amygdala.serve import config

    for env in (config.RUNTIME_ENV, config.CHANNEL_ENV, config.CONTROL_ENV, config.EVENTS_ENV):
        # setenv first so the undo is recorded even when the variable is absent: channel_address()
        # exports these, and leaked into this process they would give later test servers one socket.
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    addresses = [config.channel_address(), *config.finetune_addresses()]
    folder = Path(os.environ[config.RUNTIME_ENV])
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(a.startswith("ipc://") and Path(a[6:]).parent == folder for a in addresses)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv(config.RUNTIME_ENV, str(shared))
    with pytest.raises(config.ConfigError, match="must be an existing folder of yours with mode 0700"):
        config.channel_address()
    monkeypatch.setenv(config.RUNTIME_ENV, str(folder))
    monkeypatch.setenv(config.CHANNEL_ENV, "tcp://0.0.0.0:5555")
    with pytest.raises(config.ConfigError, match=r"^AMYGDALA_SERVE_CHANNEL=tcp://0\.0\.0\.0:5555: every socket"):
        config.channel_address()


@pytest.mark.vllm  # imports vLLM
def test_amygdala_serve_refuses_a_public_host_with_training_unless_allowed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("vllm")
    from amygdala.serve import config

    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    monkeypatch.delenv(config.ALLOW_REMOTE_ENV, raising=False)
    serve = ["serve", "--model", str(folder), "--dry-run", "--host"]
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert cli([*serve, host]) != 0
        assert f"--host {host}: with AMYGDALA_API_KEY set the training routes" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert cli([*serve, host]) == 0
    assert "AMYGDALA_ALLOW_REMOTE_TRAINING" not in capsys.readouterr().out
    assert cli([*serve, "0.0.0.0", "--allow-remote-training"]) == 0
    assert "--host 0.0.0.0" in capsys.readouterr().out
    monkeypatch.delenv(config.API_KEY_ENV)  # no training routes: any host, as before
    assert cli(["serve", "--model", str(folder), "--readout", str(_readout_dir(tmp_path)), "--dry-run", "--host", "0.0.0.0"]) == 0


def _readout_dir(tmp_path: Path) -> Path:
    from helpers.serve import make_readout

    tiny_hidden = 64  # tiny.make_model's hidden size
    return make_readout(tmp_path / "readout", hidden=tiny_hidden)


def test_plain_vllm_with_training_on_a_public_host_warns_loudly(monkeypatch, caplog):
    from amygdala.serve import config, finetune_routes

    monkeypatch.delenv(config.ALLOW_REMOTE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.amygdala"):
        finetune_routes.warn_if_remote("127.0.0.1")
        assert caplog.records == []
        finetune_routes.warn_if_remote(None)  # vLLM's default: every interface
    assert len(caplog.records) == 1 and "WARNING: the training routes (/train, /checkpoint) are reachable from the network on every interface" in caplog.text
