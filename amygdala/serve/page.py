"""``GET /amygdala/``: the page a person watches (:mod:`amygdala.view`), served by the endpoint
plugin on vLLM's own port, so one URL shows the model talking with its readout.

The page's files ship inside the package and are served from memory; the page then talks to the
same server's ``/v1/readout/manifest``, ``/v1/models`` and ``/v1/chat/completions``. On by
default; ``AMYGDALA_PAGE=0`` (``amygdala serve --no-page``) leaves the routes out.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from amygdala.serve.config import PAGE_ENV
from amygdala.view import asset

PAGE = "/amygdala/"
_TYPES = {"index.html": "text/html; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8"}


def page_enabled() -> bool:
    return os.environ.get(PAGE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def attach(app: FastAPI) -> None:
    """Add the page's routes to vLLM's app (nothing when the page is switched off)."""
    if not page_enabled():
        return
    # Read once: the files are small and never change while the server runs.
    bodies = {name: asset(name) for name in _TYPES}
    # The page must not be cached across amygdala versions, nor framed by other sites.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}

    async def index() -> Response:
        return Response(bodies["index.html"], media_type=_TYPES["index.html"], headers=headers)

    async def redirect() -> RedirectResponse:
        return RedirectResponse(PAGE)

    def serve_file(name: str):
        async def handler() -> Response:
            return Response(bodies[name], media_type=_TYPES[name], headers=headers)

        return handler

    app.add_api_route(PAGE, index, methods=["GET"], include_in_schema=False)
    app.add_api_route(PAGE.rstrip("/"), redirect, methods=["GET"], include_in_schema=False)
    for name in _TYPES:
        app.add_api_route(PAGE + name, serve_file(name), methods=["GET"], include_in_schema=False)
