"""bench/serve.py's profile counting: which py-spy samples are amygdala's own code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_share_counts_each_sample_once_for_its_outermost_amygdala_frame(tmp_path):
    root = 'process 1:"python -m vllm.entrypoints.launchers.api_server.entry --model x"'
    fwd = "model_forward_wrapper.<locals>._model_forward (amygdala/serve/hooks.py:327)"
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{root};run (vllm/engine.py:1);{fwd};matmul (torch/_ops.py:1) 50",  # vLLM's forward: not ours
        f"{root};{fwd};hook (amygdala/serve/hooks.py:204);matmul (torch/_ops.py:1) 3",  # our hook inside it
        f"{root};rewrite_stream (amygdala/serve/respond.py:184);dumps (amygdala/serve/channel.py:38) 5",
        f"{root};sched_yield (vllm/distributed/utils.py:46) 42",
    ]) + "\n")
    total, ours = load_bench().own_share(raw)
    assert total == 100
    assert dict(ours) == {"serve/hooks.py": 3, "serve/respond.py": 5}
