"""What a vLLM server's readout rows must equal: request bodies for the tiny test model and the
transformers reference (:func:`amygdala.readout.attach` on the same tokens), shared by every
test module that starts a server with the plugin.
"""

from __future__ import annotations

import torch

from amygdala.readout import Steering, attach

ATOL = 2e-3  # scores are ~10-40 in size; fp32 vLLM vs transformers differ by ~1e-5 relative
RTOL = 1e-4


def body(files, prompt, **kw) -> dict:
    return {"model": str(files[1]), "prompt": prompt, "temperature": 0, "max_tokens": 8, **kw}


def chat_body(files, content, **kw) -> dict:
    return {"model": str(files[1]), "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6, **kw}


def reference(hf, readout, ids: list[int], steering: Steering | None = None):
    """amygdala's transformers readout over ``ids``: scores [T, L, C] and logits [T, vocab]."""
    with attach(hf, readout, steering=steering) as session, torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    return session.scores()[0], logits


def assert_parity(hf, readout, prompt_ids, gen_ids, rows, steering=None, greedy=True):
    """vLLM's row k = the transformers block output at the position that sampled token k."""
    scores, logits = reference(hf, readout, list(prompt_ids) + list(gen_ids), steering)
    p = len(prompt_ids)
    assert len(rows) == len(gen_ids)
    got = torch.tensor(rows)
    want = scores[p - 1 : p - 1 + len(gen_ids)]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    if greedy:  # and vLLM's greedy tokens are transformers' (steered) argmax
        assert logits[p - 1 : p - 1 + len(gen_ids)].argmax(-1).tolist() == list(gen_ids)


def streamed_rows(chunks: list[dict]) -> list:
    """Every token's rows from a stream, in order; a chunk of several tokens lists them all."""
    rows = []
    for c in chunks:
        for ch in c["choices"]:
            if "readout" in ch:
                many = ch.get("readout_tokens", [ch["readout"]])
                assert ch["readout"] == many[-1] and len(ch["readout"]) == 2
                rows += many
    return rows
