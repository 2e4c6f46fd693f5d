"""The running ``amygdala serve`` as the teach jobs see it: completions with readout and steering,
and the training routes. Plain HTTP (urllib), so this package never imports the server.

Prompts go as token IDs and ``return_token_ids`` brings the generated IDs back: a sample built
from a generation trains on exactly the tokens the model produced, never a re-tokenization of
their text.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from amygdala import AmygdalaError

API_KEY_ENV = "AMYGDALA_API_KEY"


class ServerError(AmygdalaError):
    """The server refused a request or could not be reached; the message is the server's."""


@dataclass
class Generation:
    """One choice: the generated token IDs and, per token, the readout's [n_layers][n_concepts] rows."""

    token_ids: list[int]
    rows: list[list[list[float]]] = field(default_factory=list)
    finish_reason: str | None = None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _KeepKeyAtHome(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the origin when the request carries the training key.

    Why: urllib's own handler copies every header, ``Authorization`` included, onto a redirect
    to any host, so a server (or anyone on the path) answering 302 to elsewhere would get the key."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.has_header("Authorization") and _origin(newurl) != _origin(req.full_url):
            raise ServerError(f"{req.full_url}: redirected ({code}) to another origin ({newurl}); not followed, so the "
                              "training key is not sent there. Give --server the address that answers itself")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_KeepKeyAtHome())


class Server:
    """``url``: the server's root (``http://127.0.0.1:8000``; a trailing ``/v1`` is dropped)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        url = url.rstrip("/")
        self.root = url[:-3] if url.endswith("/v1") else url
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self._model: str | None = None
        self._manifest: dict | None = None
        #: Job settings added to every ``/train`` config (the CLI's anchor, holdout, dpop flags):
        #: teach, dream and distill build their own configs; these reach all three unchanged.
        self.train_options: dict = {}

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, body: dict | None = None, *, auth: bool = False,
                 timeout: float | None = None):
        headers = {"Content-Type": "application/json"}
        if auth:
            if not self.api_key:
                raise ServerError(f"{path} needs the server's training key: set {API_KEY_ENV} or pass --api-key")
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method, headers=headers)
        try:
            return _OPENER.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"{}").get("error", {})
                message = err.get("message") if isinstance(err, dict) else str(err)
            except (json.JSONDecodeError, AttributeError):
                message = None
            raise ServerError(f"{method} {self.root}{path}: HTTP {e.code}: {message or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{self.root}: cannot reach the server ({getattr(e, 'reason', e)}); is `amygdala serve` "
                              "running there?") from None

    def call(self, method: str, path: str, body: dict | None = None, *, auth: bool = False, timeout: float | None = None) -> dict:
        with self._request(method, path, body, auth=auth, timeout=timeout) as r:
            return json.loads(r.read())

    # ------------------------------------------------------------------ the model
    def model(self) -> str:
        """The served model's id (for ``amygdala serve --model DIR``, that folder)."""
        if self._model is None:
            data = self.call("GET", "/v1/models").get("data") or []
            if not data:
                raise ServerError(f"{self.root}/v1/models lists no model")
            self._model = data[0].get("root") or data[0]["id"]
        return self._model

    def manifest(self) -> dict:
        """The readout's concepts, layers and statistics (404 -> the server has no readout)."""
        if self._manifest is None:
            try:
                self._manifest = self.call("GET", "/v1/readout/manifest")
            except ServerError as e:
                raise ServerError(f"{e}; start the server with --readout to score by concepts") from None
        return self._manifest

    def readout_mode(self) -> str:
        """z-scores when the readout has neutral-text statistics, raw projections otherwise."""
        return "zscore" if self.manifest().get("mean") is not None else "raw"

    def check_concepts(self, names: Sequence[str], flag: str) -> None:
        have = self.manifest()["concepts"]
        for name in names:
            if name not in have:
                raise ServerError(f"{flag} {name!r}: the served readout has no such concept (it has {', '.join(have[:12])}"
                                  f"{' ...' if len(have) > 12 else ''})")

    def _body(self, prompt: Sequence[int], max_tokens: int, temperature: float, n: int, steer, readout: bool,
              seed: int | None) -> dict:
        body = {"model": self.model(), "prompt": list(prompt), "max_tokens": max_tokens, "temperature": temperature,
                "n": n, "return_token_ids": True, "readout": self.readout_mode() if readout else False}
        if steer:
            body["steer"] = [{"concept": c, "strength": s} for c, s in steer.items()]
        if seed is not None:
            body["seed"] = seed
        return body

    def generate(self, prompt: Sequence[int], max_tokens: int, *, temperature: float = 0.0, n: int = 1,
                 steer: dict[str, float] | None = None, readout: bool = True, seed: int | None = None) -> list[Generation]:
        """``n`` completions of the prompt's token IDs (non-streaming)."""
        out = self.call("POST", "/v1/completions", self._body(prompt, max_tokens, temperature, n, steer, readout, seed))
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [Generation(list(c.get("token_ids") or []), c.get("readout") or [], c.get("finish_reason")) for c in choices]

    def stream(self, prompt: Sequence[int], max_tokens: int, *, temperature: float, n: int = 1,
               steer: dict[str, float] | None = None, seed: int | None = None) -> list[Generation]:
        """The same, streamed: each chunk's token IDs and readout rows (``readout_tokens`` when vLLM
        coalesced several tokens into one chunk) are collected per choice."""
        body = {**self._body(prompt, max_tokens, temperature, n, steer, True, seed), "stream": True}
        gens = [Generation([]) for _ in range(n)]
        with self._request("POST", "/v1/completions", body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:]).get("choices") or []:
                    g = gens[c["index"]]
                    ids = c.get("token_ids") or []
                    g.token_ids.extend(ids)
                    if c.get("readout_tokens") is not None:
                        g.rows.extend(c["readout_tokens"])
                    elif c.get("readout") is not None:
                        g.rows.append(c["readout"])
                    g.finish_reason = c.get("finish_reason") or g.finish_reason
        return gens

    def prompt_token_scores(self, prompt: Sequence[int]) -> list[tuple[float, int]]:
        """Per token of the prompt after the first: its log-probability given the ones before it and
        its rank among the vocabulary (1: the model's own top prediction), from vLLM's ``prompt_logprobs``
        (one forward pass over the prompt; the entry of each prompt token is always included)."""
        out = self.call("POST", "/v1/completions", {"model": self.model(), "prompt": list(prompt), "max_tokens": 1,
                                                    "temperature": 0, "prompt_logprobs": 0, "readout": False})
        entries = out["choices"][0].get("prompt_logprobs") or []
        scores = []
        for tok, entry in zip(prompt[1:], entries[1:]):
            hit = entry.get(str(tok)) if entry else None
            if hit is None:
                raise ServerError(f"{self.root}: no log-prob for prompt token {tok}; a vLLM without prompt_logprobs?")
            if not isinstance(hit, dict) or hit.get("rank") is None:
                raise ServerError(f"{self.root}: prompt token {tok} came without a rank; a vLLM without ranked prompt_logprobs?")
            scores.append((float(hit["logprob"]), int(hit["rank"])))
        return scores

    def prompt_logprobs(self, prompt: Sequence[int]) -> list[float]:
        """The log-probability of each token of the prompt after the first, given the ones before it."""
        return [lp for lp, _ in self.prompt_token_scores(prompt)]

    def perplexity(self, prompt: Sequence[int]) -> float:
        """exp of the mean negative log-likelihood of the prompt's tokens after the first."""
        lps = self.prompt_logprobs(prompt)
        if not lps:
            raise ServerError(f"a {len(prompt)}-token text has no token to score; give longer texts")
        return math.exp(-sum(lps) / len(lps))

    # ------------------------------------------------------------------ training routes
    def train(self, body: dict) -> dict:
        if self.train_options:
            body = {**body, "config": {**(body.get("config") or {}), **self.train_options}}
        return self.call("POST", "/train", body, auth=True, timeout=60)

    def status(self) -> dict:
        return self.call("GET", "/train/status", auth=True, timeout=60)

    def snapshot(self) -> dict:
        return self.call("POST", "/train/snapshot", {}, auth=True)

    def rollback(self, snapshot: str) -> dict:
        return self.call("POST", "/train/rollback", {"snapshot": snapshot}, auth=True)

    def checkpoint(self) -> dict:
        return self.call("POST", "/checkpoint", {}, auth=True)
