"""The vLLM plugin with the real default model (slow): ``amygdala serve`` on SmolLM2-135M-Instruct
reads out what transformers reads out. Its own server, as it was in tests/test_serve.py."""

from __future__ import annotations

import pytest
import torch

from helpers import serve as sh
from amygdala.readout import Readout

vllm = pytest.mark.vllm


@vllm
@pytest.mark.slow
def test_default_model_parity(tmp_path):
    """SmolLM2-135M-Instruct through `amygdala serve`: readout equals transformers' readout."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    from amygdala.models.resolve import model_info, resolve_model
    from amygdala.readout import attach as attach_hf
    from transformers import AutoModelForCausalLM

    path = resolve_model("default")
    info = model_info(path)
    g = torch.Generator().manual_seed(0)
    layers = [info.num_layers // 2, info.num_layers - 2]
    vectors = {l: torch.nn.functional.normalize(torch.randn(3, info.hidden_size, generator=g), dim=1) for l in layers}
    readout = Readout(["calm", "angry", "joyful"], layers, vectors)
    readout.save(tmp_path / "ro")
    port = sh.free_port()
    log = open(tmp_path / "server.log", "w")
    env = sh.server_env(None)
    # `amygdala serve ...`, through the subcommand's own parser (main.py wires it the same way).
    launch = (
        "import argparse, sys; from amygdala.cli import serve as cli; p = argparse.ArgumentParser(); "
        "cli.add_parser(p.add_subparsers()); a = p.parse_args(['serve'] + sys.argv[1:]); sys.exit(a.func(a))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, "--model", "default", "--readout", str(tmp_path / "ro"), "--port", str(port),
         "--", "--dtype", "float32", "--max-model-len", "512"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    server = sh.Server(proc, port, tmp_path / "server.log")
    try:
        sh.wait_ready(server, 420)
        code, r = server.post("/completions", {"model": "default", "prompt": "I just heard the news and I feel", "max_tokens": 12, "temperature": 0, "return_token_ids": True})
        assert code == 200, r
        c = r["choices"][0]
    finally:
        server.stop()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = c["prompt_token_ids"] + c["token_ids"]
    with attach_hf(hf, readout) as s, torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    p = len(c["prompt_token_ids"])
    want = s.scores()[0, p - 1 : p - 1 + len(c["token_ids"])]
    scale = want.abs().max()
    torch.testing.assert_close(torch.tensor(c["readout"]), want, atol=1e-3 * float(scale), rtol=1e-3)
    assert logits[p - 1 : -1].argmax(-1).tolist() == c["token_ids"]
