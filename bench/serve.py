"""Decode throughput of vLLM with and without amygdala's readout and steering (issue 6).

    ./dev bench serve [--concurrency 16] [--tokens 64] [--repeats 3] [--readout OUT]

Two servers on the default model, started together and measured one at a time, in turns:
a plain vLLM server (no plugin) and one with the plugin and a readout loaded. The modes:

- plain:    plain server;
- idle:     plugin server, ``"readout": false`` (the cost of the hooks alone);
- readout:  plugin server, readout on (every streamed chunk carries its scores);
- steer:    plugin server, readout off, one concept steered at the readout's layers;
- both:     readout on and steering;
- filtered: readout on, filtered to ``--filter-concepts`` concepts (``"readout": {"concepts": [...]}``,
            issue 26): the same matmul in the worker, fewer floats in every chunk.

Besides tokens/s, the bytes of one streamed completion's body per generated token, per mode
(``readout`` against ``filtered`` is what a client that watches a few concepts saves).

Workload per measurement: ``--concurrency`` streamed completions sent at once, each forced to
``--tokens`` tokens (``ignore_eos``). Decode tokens/s = concurrency * (tokens - 1) / (T(tokens) -
T(1)), where T(n) is the wall time of the batch with n tokens: subtracting the one-token batch
removes prefill and request overhead. The same difference is also taken in CPU time of the
server's processes (API server, engine core, worker): CPU milliseconds per decoded token.

On a shared machine other processes come and go, so each plugin mode is measured right after a
plain measurement and compared with it: the figures are medians over ``--repeats`` turns of these
paired ratios (with the spread), besides the median tokens/s of each mode.
Without ``--readout``, a random readout of ``--concepts`` concepts (default 171, the original's
emotion count) at ``--layers`` (relative depths, default 0.5 and 0.66) stands in: the cost does
not depend on the vectors. ``--modes`` picks which modes run (plain always does).

``--profile SECONDS`` then samples the plugin server's processes (API server, engine, worker)
with py-spy (not a dependency of the project: ``pip install py-spy``) for that long per mode,
batches running, and prints the share of samples whose stack holds an amygdala frame (besides
the forward wrapper that encloses vLLM's whole forward), split by file: what the plugin's own
code costs, measured instead of inferred from the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import torch

from amygdala.models.resolve import DEFAULT_MODEL_NAME, model_info, resolve_model
from amygdala.readout import Readout

SERVER = [sys.executable, "-P", "-m", "vllm.entrypoints.launchers.api_server.entry"]
WORDS = ("the morning light came in through the window and she thought about the letter again "
         "before the kettle began to sing in the quiet kitchen").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_readout(path: Path, num_layers: int, hidden: int, n: int = 171, depths: tuple[float, ...] = (0.5, 0.66)) -> Path:
    g = torch.Generator().manual_seed(0)
    layers = sorted({round(r * (num_layers - 1)) for r in depths})
    vectors = {l: torch.nn.functional.normalize(torch.randn(n, hidden, generator=g), dim=1) for l in layers}
    stats = {l: torch.zeros(n) for l in layers}, {l: torch.ones(n) for l in layers}
    Readout([f"concept_{i}" for i in range(n)], layers, vectors, *stats).save(path)
    return path


def start(model: Path, log: Path, readout: Path | None, vllm_args: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("AMYGDALA_READOUT", None)
    env.pop("VLLM_READOUT_VECTORS", None)
    if readout is None:
        env["VLLM_PLUGINS"] = ""  # a plain vLLM: no general or endpoint plugin at all
    else:
        env["AMYGDALA_READOUT"] = str(readout)
        env["VLLM_PLUGINS"] = "amygdala"
    cmd = [*SERVER, "--model", str(model), "--served-model-name", "m", "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", *vllm_args]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), port


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"server not ready after {timeout} s; see {log}")


async def one(client: httpx.AsyncClient, port: int, body: dict) -> int:
    """Stream one completion; returns the number of SSE events (work the client must do)."""
    events = 0
    async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            events += line.startswith("data: ")
    return events


async def body_bytes(port: int, extra: dict, tokens: int) -> float:
    """Bytes of one streamed completion's body per generated token."""
    size = 0
    body = {"model": "m", "prompt": " ".join(WORDS), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, **extra}
    async with httpx.AsyncClient(timeout=600) as client:
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                size += len(chunk)
    return size / tokens


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def batch(port: int, extra: dict, concurrency: int, tokens: int) -> float:
    """Wall time of ``concurrency`` streamed completions of ``tokens`` tokens sent at once."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        bodies = [
            {"model": "m", "prompt": " ".join(WORDS[i % 5 :] + WORDS[: i % 5]), "max_tokens": tokens,
             "temperature": 0, "ignore_eos": True, "stream": True, **extra}
            for i in range(concurrency)
        ]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, port, b) for b in bodies))
        return time.perf_counter() - t0


def decode_cost(pid: int, port: int, extra: dict, concurrency: int, tokens: int) -> tuple[float, float]:
    """(decode tokens per wall second, server CPU milliseconds per decoded token)."""
    c0 = tree_cpu(pid)
    t_full = asyncio.run(batch(port, extra, concurrency, tokens))
    c1 = tree_cpu(pid)
    t_one = asyncio.run(batch(port, extra, concurrency, 1))
    c2 = tree_cpu(pid)
    decoded = concurrency * (tokens - 1)
    return decoded / max(t_full - t_one, 1e-9), 1000 * ((c1 - c0) - (c2 - c1)) / decoded


def own_share(raw: Path) -> tuple[int, Counter[str]]:
    """(samples, samples per amygdala file) of a py-spy ``--format raw`` file: one stack a line,
    frames ``;``-separated, the sample count last. A sample counts once, for the outermost
    amygdala frame that is not the forward wrapper (which holds vLLM's forward inside it)."""
    total, ours = 0, Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        own = [f for f in stack.split(";") if "amygdala/" in f and "_model_forward" not in f
               and "api_server.entry" not in f]  # the root frame names the process's command line
        if own:
            ours[own[0].split("amygdala/", 1)[1].split(":", 1)[0]] += int(n)
    return total, ours


def profile(pid: int, port: int, modes: dict, seconds: int, concurrency: int, tokens: int, work: Path) -> None:
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("--profile needs py-spy on PATH (pip install py-spy)")
    print(f"\nprofile: py-spy, {seconds} s per mode, 40 samples/s, every process of the plugin server")
    for name, (_, mode_port, extra) in modes.items():
        if mode_port != port:
            continue  # the plain server has no amygdala code to find
        raw = work / f"profile-{name}.txt"
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "-r", "40",
                                     "-d", str(seconds), "--format", "raw", "-o", str(raw)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while spy_proc.poll() is None:
            asyncio.run(batch(port, extra, concurrency, tokens))
        if spy_proc.returncode != 0 or not raw.exists():
            sys.exit(f"py-spy failed ({spy_proc.returncode}): {spy_proc.stderr.read().decode()[-300:]}")
        total, ours = own_share(raw)
        total = max(total, 1)  # py-spy saw no running thread at all: every share 0
        split = ", ".join(f"{f} {n / total:.2%}" for f, n in ours.most_common())
        print(f"{name:8} amygdala {sum(ours.values()) / total:.2%} of {total} samples ({split or 'none'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--readout", type=Path, default=None, help="readout folder (default: random, 171 concepts)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--concepts", type=int, default=171, help="concepts of the random readout")
    ap.add_argument("--layers", default="0.5,0.66", help="relative depths of the random readout's layers")
    ap.add_argument("--filter-concepts", type=int, default=3, help="concepts the filtered mode asks for")
    ap.add_argument("--modes", default="idle,readout,steer,both,filtered", help="modes besides plain")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="then sample the plugin server with py-spy this long per mode (0: off)")
    args = ap.parse_args()

    model = resolve_model(args.model)
    info = model_info(model)
    work = Path(tempfile.mkdtemp(prefix="amygdala-bench-serve-"))
    depths = tuple(float(x) for x in args.layers.split(","))
    readout_path = args.readout or random_readout(work / "readout", info.num_layers, info.hidden_size, args.concepts, depths)
    readout = Readout.load(readout_path)
    vllm_args = ["--dtype", args.dtype, "--max-model-len", "512", "--max-num-seqs", str(args.concurrency)]
    print(f"model {info.name} ({info.num_layers} layers, hidden {info.hidden_size}); readout "
          f"{len(readout.concepts)} concepts at layers {readout.layers}; {args.concurrency} x {args.tokens} "
          f"tokens, {args.repeats} turns; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    plain, plain_port = start(model, work / "plain.log", None, vllm_args)
    plugged, plug_port = start(model, work / "plugin.log", readout_path, vllm_args)
    try:
        wait_ready(plain, plain_port, work / "plain.log")
        wait_ready(plugged, plug_port, work / "plugin.log")
        steer = {"steer": [{"concept": readout.concepts[0], "strength": 4.0}]}
        modes = {
            "plain": (plain, plain_port, {}),
            "idle": (plugged, plug_port, {"readout": False}),
            "readout": (plugged, plug_port, {}),
            "steer": (plugged, plug_port, {"readout": False, **steer}),
            "both": (plugged, plug_port, steer),
            "filtered": (plugged, plug_port, {"readout": {"concepts": readout.concepts[: args.filter_concepts]}}),
        }
        wanted = {"plain", *args.modes.split(",")}
        modes = {m: v for m, v in modes.items() if m in wanted}
        for _, port, extra in modes.values():  # warm up: first requests pay one-off costs
            asyncio.run(batch(port, extra, args.concurrency, 4))
        tps: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        tps_ratio: dict[str, list[float]] = {m: [] for m in modes if m != "plain"}
        cpu_ratio: dict[str, list[float]] = {m: [] for m in modes if m != "plain"}
        size = {m: asyncio.run(body_bytes(port, extra, args.tokens)) for m, (_, port, extra) in modes.items()}
        for turn in range(args.repeats):
            line = []
            for name in tps_ratio:
                for m in ("plain", name):
                    proc, port, extra = modes[m]
                    t, c = decode_cost(proc.pid, port, extra, args.concurrency, args.tokens)
                    tps[m].append(t)
                    cpu[m].append(c)
                tps_ratio[name].append(tps[name][-1] / tps["plain"][-1])
                cpu_ratio[name].append(cpu[name][-1] / cpu["plain"][-1])
                line.append(f"{name} {tps[name][-1]:.0f}/{tps['plain'][-1]:.0f} tok/s")
            print(f"turn {turn + 1}: " + ", ".join(line), flush=True)
        if args.profile:
            profile(plugged.pid, plug_port, modes, args.profile, args.concurrency, args.tokens, work)
    finally:
        for proc in (plain, plugged):
            proc.send_signal(signal.SIGINT)
        for proc in (plain, plugged):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    med_t = {m: statistics.median(v) for m, v in tps.items()}
    med_c = {m: statistics.median(v) for m, v in cpu.items()}

    def spread(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
        return f"{statistics.median(v):.3f} [{q[0]:.2f}-{q[2]:.2f}]"

    print(f"\n{'mode':8} {'tok/s':>7} {'CPU ms/tok':>10}   {'tok/s vs plain':>20}   {'CPU/tok vs plain':>20}   {'bytes/tok':>9}")
    for m in modes:
        paired = (spread(tps_ratio[m]), spread(cpu_ratio[m])) if m != "plain" else ("1", "1")
        print(f"{m:8} {med_t[m]:7.1f} {med_c[m]:10.2f}   {paired[0]:>20}   {paired[1]:>20}   {size[m]:9.0f}")
    print("(ratios: median [quartiles] over turns of each mode against the plain run just before it)")
    print(f"server logs: {work}")
    if args.json:
        name = DEFAULT_MODEL_NAME if args.model == "default" else str(model)
        args.json.write_text(json.dumps({
            "model": name, "concurrency": args.concurrency, "tokens": args.tokens, "median_tok_s": med_t,
            "median_cpu_ms_per_token": med_c, "tok_s_ratio_vs_plain": tps_ratio, "cpu_ratio_vs_plain": cpu_ratio,
            "tok_s": tps, "cpu_ms_per_token": cpu, "bytes_per_token": size,
        }, indent=1))


if __name__ == "__main__":
    main()
