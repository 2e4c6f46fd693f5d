"""Engine side, in vLLM's worker process: forward hooks on the decoder layers, per-request
steering and per-token scores.

vLLM runs one forward pass over a flat batch of tokens from many requests. The model runner
knows the boundaries: before each forward (:func:`begin_step`, called from the runner's
``_model_forward``) we read, from the same persistent buffers vLLM builds its attention
metadata from, the batch order ``input_batch.req_ids``, the token offsets
``query_start_loc`` and ``num_computed_tokens``. From those:

- steering: each token row gets its own request's delta (a gather from a small per-step
  table, row 0 = zeros), added to the residual stream after the chosen layers; a token's
  position is ``num_computed_tokens + its offset in the request's rows``, so a placed term
  ("generated": position >= the prompt's length, "prompt", ``from_token``) is added to the
  rows :func:`amygdala.readout.runtime.placement_mask` picks, the rule transformers uses;
- readout: the row sampled from is the last of each request's rows in this step; the token
  sampled from it is generated token ``k = position + 1 - prompt_len`` (``k < 0`` for a
  partial prefill chunk, which samples nothing, so it is skipped). A request that reads its
  prompt (``readout_prompt``) also has every prefill row read, with the same rule: position
  ``p`` "samples" prompt token ``p + 1``, ``k = p + 1 - prompt_len < 0``.

vLLM's Llama-style decoder layers return ``(hidden_states, residual)`` and fuse the residual
add into the next layer's RMSNorm, so the block output in the transformers sense is
``hidden_states + residual``; steering is added to ``residual``, which the next norm (or the
final norm) adds in. Layers that return a single tensor are handled as block outputs directly.

Parallelism (docs/scale.md). Under tensor parallelism every rank of a stage holds the same
block output after the all-reduce, so every rank steers (each must, or the ranks' activations
would differ) and only tensor rank 0 sends scores. Under pipeline parallelism a stage's model
holds ``PPMissingLayer`` placeholders for the layers other stages own and runs only its own, so
steering reaches the stage that owns the layer by construction, and each stage's tensor rank 0
sends the scores of the readout layers it owns, labelled with their manifest positions; the API
side merges the stages' parts (:class:`amygdala.serve.proxy.RowStore`).

Hooks need eager mode: a compiled graph or CUDA graph would freeze the per-step data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from amygdala.models.layers import find_layers
from amygdala.readout import Readout, ReadoutError, Steering
from amygdala.readout.runtime import placement_mask
from amygdala.serve.channel import Sender
from amygdala.serve.config import CHANNEL_ENV, WIRE_KEY
from amygdala.serve.patching import not_eager

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level


@dataclass
class _Request:
    """A request's parsed wire spec, cached for its lifetime in the worker."""

    tag: str | None
    deltas: dict[int, torch.Tensor]  # the terms added at every position
    prompt: bool = False  # read every prompt position too
    #: terms placed at some positions only: (positions, from_token, per-layer deltas)
    placed: list[tuple[str, int | None, dict[int, torch.Tensor]]] = field(default_factory=list)


@dataclass
class _Plan:
    """This forward step's steering and readout work."""

    num_tokens: int
    steer_idx: torch.Tensor | None = None  # [num_tokens] row of the per-layer table, 0 = none
    steer_tables: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1 + n, hidden]
    read_rows: torch.Tensor | None = None  # [m] token rows whose scores are wanted
    read_keys: list[tuple[str, str, int]] = field(default_factory=list)  # (tag, req_id, k)
    scores: torch.Tensor | None = None  # [m, n_layers, n_concepts + n_tracks] float32


class WorkerState:
    """Hooks and per-step state on one model runner; created once the model is loaded."""

    def __init__(self, runner, readout: Readout, sends: bool):
        vllm_config = runner.vllm_config
        model_config = runner.model_config
        check_supported(vllm_config)
        self.readout = readout
        self.layers = find_layers(runner.get_model())
        readout.check_model(len(self.layers), model_config.get_hidden_size(), str(model_config.model))
        self.device = runner.device
        self.dtype = model_config.dtype
        self.zero = torch.zeros(model_config.get_hidden_size(), device=self.device, dtype=self.dtype)
        owned = owned_layers(self.layers)
        # This stage's readout layers: (layer, its position in the manifest), in manifest order.
        mine = [(l, pos) for pos, l in enumerate(readout.layers) if l in owned]
        self.read_pos = {l: j for j, (l, _) in enumerate(mine)}  # layer -> column of this stage's scores
        self.manifest_pos = [pos for _, pos in mine]
        # The tracks (emotionality, valence; files since issue 23) are read in the same matmul, as
        # extra columns after the concepts: one row per token carries both, so the channel and the
        # API side's row store need nothing new; amygdala.serve.respond splits them again.
        self.vt = {l: read_matrix(readout, l).to(self.device, torch.float32).T.contiguous() for l, _ in mine}
        self.width = len(readout.concepts) + len(readout.track_names)
        self.requests: dict[str, _Request | None] = {}
        self.plan: _Plan | None = None
        address = os.environ.get(CHANNEL_ENV)
        self.sender = Sender(address) if address and sends and mine else None
        for i in owned:
            self.layers[i].register_forward_hook(self._make_hook(i))
        log.info("amygdala: readout hooks on %d of %d layers; reading layers %s%s", len(owned), len(self.layers),
                 [l for l, _ in mine], " (sending scores)" if self.sender is not None else "")

    # ------------------------------------------------------------------ per step
    def begin_step(self, runner) -> None:
        self.plan = None
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return
        req_ids = batch.req_ids[:num_reqs]
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        if len(self.requests) > len(runner.requests):
            self.requests = {r: v for r, v in self.requests.items() if r in runner.requests}
        steered: list[tuple[int, _Request, int]] = []
        reads: list[tuple[int, tuple[str, str, int]]] = []
        for i, rid in enumerate(req_ids):
            state = runner.requests[rid]
            req = self._request(rid, state.sampling_params)
            if req is None:
                continue
            if req.deltas or req.placed:
                steered.append((i, req, state.num_prompt_tokens))
            if req.tag is not None:
                k = int(computed[i] + qsl[i + 1] - qsl[i]) - state.num_prompt_tokens
                if k >= 0:
                    reads.append((int(qsl[i + 1]) - 1, (req.tag, rid, k)))
                if req.prompt and int(computed[i]) < state.num_prompt_tokens - 1:
                    # Prefill rows: position p "samples" prompt token p + 1, so k = p + 1 - P < 0
                    # (the last prompt position samples the first generated token, k = 0, above).
                    first = int(computed[i]) + 1 - state.num_prompt_tokens
                    for j in range(int(qsl[i]), int(qsl[i + 1])):
                        kj = first + j - int(qsl[i])
                        if kj < 0:
                            reads.append((j, (req.tag, rid, kj)))
        if not steered and not (reads and self.read_pos):
            return
        plan = _Plan(num_tokens=int(qsl[num_reqs]))
        if steered:
            idx = np.zeros(plan.num_tokens, dtype=np.int64)
            rows: list[dict[int, torch.Tensor]] = []  # the table's rows after row 0
            for i, req, prompt_len in steered:
                lo, hi = int(qsl[i]), int(qsl[i + 1])
                if not req.placed:
                    rows.append(req.deltas)
                    idx[lo:hi] = len(rows)
                    continue
                positions = int(computed[i]) + np.arange(hi - lo)
                # Which placed terms each row gets, as bits; one table row per combination present.
                code = np.zeros(hi - lo, dtype=np.int64)
                for bit, (where, start, _) in enumerate(req.placed):
                    code |= placement_mask(positions, prompt_len, where, start).astype(np.int64) << bit
                for c in np.unique(code).tolist():
                    row = _summed([req.deltas] + [d for bit, (_, _, d) in enumerate(req.placed) if c >> bit & 1])
                    if row:
                        rows.append(row)
                        idx[lo:hi][code == c] = len(rows)
            if rows:
                plan.steer_idx = torch.from_numpy(idx).to(self.device)
                for l in sorted({l for row in rows for l in row}):
                    plan.steer_tables[l] = torch.stack([self.zero] + [row.get(l, self.zero) for row in rows])
        if reads and self.read_pos:
            plan.read_rows = torch.tensor([r for r, _ in reads], device=self.device)
            plan.read_keys = [key for _, key in reads]
            plan.scores = torch.empty(len(reads), len(self.read_pos), self.width, device=self.device)
        self.plan = plan

    def end_step(self, send: bool = True) -> None:
        plan, self.plan = self.plan, None
        if not send or plan is None or plan.scores is None or self.sender is None:
            return
        tags, rids, ks = (list(x) for x in zip(*plan.read_keys))
        self.sender.send(tags, rids, ks, plan.scores.cpu().numpy(), self.manifest_pos)

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, layer: int):
        def hook(_module, _inputs, output):
            plan = self.plan
            if plan is None:
                return None
            table = plan.steer_tables.get(layer)
            reading = plan.scores is not None and layer in self.read_pos
            if table is None and not reading:
                return None
            fused = isinstance(output, tuple) and len(output) == 2 and output[1] is not None
            hidden, residual = (output[0], output[1]) if fused else (output, None)
            if table is not None:
                delta = table[_pad(plan.steer_idx, hidden.shape[0])]
                if fused:
                    residual = residual + delta
                else:
                    hidden = hidden + delta
            if reading:
                rows = plan.read_rows
                block = hidden[rows] + residual[rows] if fused else hidden[rows]
                plan.scores[:, self.read_pos[layer]] = block.float() @ self.vt[layer]
            if table is None:
                return None
            return (hidden, residual) if fused else hidden

        return hook

    def _request(self, rid: str, params) -> _Request | None:
        if rid in self.requests:
            return self.requests[rid]
        wire = (getattr(params, "extra_args", None) or {}).get(WIRE_KEY)
        req = None
        if isinstance(wire, dict):
            try:
                groups = self._deltas(wire.get("steer") or [])
                everywhere = groups.pop(("all", None), {})
                req = _Request(wire.get("tag"), everywhere, bool(wire.get("prompt")),
                               [(where, start, d) for (where, start), d in groups.items()])
            except (ReadoutError, KeyError, TypeError, ValueError):
                # The API server checked the spec; a failure here is a bug, not bad input.
                log.exception("amygdala: ignoring the steering of request %s", rid)
                req = _Request(wire.get("tag"), {})
        self.requests[rid] = req
        return req

    def _deltas(self, items: list[dict]) -> dict[tuple[str, int | None], dict[int, torch.Tensor]]:
        """The items summed per placement: (positions, from_token) -> per-layer deltas."""
        groups: dict[tuple[str, int | None], Steering] = {}
        for item in items:
            if "concept" in item:
                part = Steering.from_concepts(self.readout, {item["concept"]: float(item["strength"])}, list(item["layers"]))
            else:
                vector = torch.tensor(item["vector"], dtype=torch.float32)
                part = Steering.from_vector(vector, float(item["strength"]), list(item["layers"]))
            key = (item.get("positions", "all"), item.get("from_token"))
            groups[key] = groups[key] + part if key in groups else part
        return {key: {l: d.to(self.device, self.dtype) for l, d in g.deltas.items()} for key, g in groups.items()}


def _summed(parts: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per-layer sum of several terms' deltas."""
    out: dict[int, torch.Tensor] = {}
    for part in parts:
        for l, d in part.items():
            out[l] = out[l] + d if l in out else d
    return out


def read_matrix(readout: Readout, layer: int) -> torch.Tensor:
    """The directions one layer's rows are projected on: the concept vectors [n_concepts, hidden],
    then the track directions [n_tracks, hidden] where the file has them (older files: none)."""
    vectors = readout.vectors[layer].float()
    if not readout.track_names:
        return vectors
    return torch.cat([vectors, readout.track_vectors[layer].float()])


def _pad(idx: torch.Tensor, rows: int) -> torch.Tensor:
    """Token rows beyond the scheduled ones (vLLM pads batches for CUDA graphs) get row 0."""
    if idx.shape[0] >= rows:
        return idx[:rows]
    return torch.cat([idx, idx.new_zeros(rows - idx.shape[0])])


def check_supported(vllm_config) -> None:
    if not_eager(vllm_config):
        raise ReadoutError(
            "amygdala's readout and steering hook the decoder layers and need eager mode: "
            "start vLLM with --enforce-eager"
        )
    if vllm_config.speculative_config is not None:
        raise ReadoutError("amygdala's readout does not support speculative decoding; drop --speculative-config")
    if vllm_config.parallel_config.pipeline_parallel_size > 1 and cpu_pipeline_broken():
        raise ReadoutError(
            "vLLM's CPU build up to 0.32 cannot serve pipeline parallelism (its engine dies on the first request): "
            "use --tensor-parallel-size instead, or a GPU build (docs/scale.md)")


#: The last vLLM release (major, minor) whose CPU build dies on the first pipeline-parallel
#: request (KeyError in the scheduler's update_from_output); tests/test_serve_parallel.py
#: watches plain vLLM for the fix.
CPU_PIPELINE_BROKEN_UP_TO = (0, 32)


def cpu_pipeline_broken() -> bool:
    """Whether this vLLM is a CPU build known to fail pipeline parallelism, so we refuse at
    start rather than let the engine die on the first request. Later releases are let through."""
    import vllm
    from vllm.platforms import current_platform

    release = tuple(int(x) for x in vllm.__version__.split(".")[:2] if x.isdigit())
    return current_platform.is_cpu() and release <= CPU_PIPELINE_BROKEN_UP_TO


def owned_layers(layers) -> list[int]:
    """Indices of the decoder layers this pipeline stage runs: vLLM's ``make_layers`` fills the
    other stages' slots with ``PPMissingLayer`` (all layers are real without pipeline parallelism)."""
    return [i for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer"]


def install(worker) -> None:
    """Attach the hooks to ``worker``'s freshly loaded model (called after ``load_model``)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    from amygdala.serve.config import load_readout

    readout = load_readout()
    if readout is not None:
        # Tensor rank 0 of each pipeline stage sends: the other tensor ranks hold the same block outputs.
        sends = get_tensor_model_parallel_rank() == 0
        worker.model_runner._amygdala = WorkerState(worker.model_runner, readout, sends)


def model_forward_wrapper(original):
    """``GPUModelRunner._model_forward``, giving each real forward its step plan (the CPU runner inherits it)."""

    def _model_forward(self, *args, **kwargs):
        state: WorkerState | None = getattr(self, "_amygdala", None)
        if state is None:
            return original(self, *args, **kwargs)
        state.begin_step(self)
        done = False
        try:
            out = original(self, *args, **kwargs)
            done = True
            return out
        finally:
            state.end_step(send=done)

    return _model_forward
