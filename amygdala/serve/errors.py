"""Error responses in vLLM's (and OpenAI's) shape, so clients handle ours like any other."""

from __future__ import annotations

from http import HTTPStatus

KINDS = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError",
    429: "RateLimitError", 503: "ServiceUnavailableError", 504: "TimeoutError",
}


def error_response(message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
    """A JSON error body ``{"error": {message, type, param, code}}`` with ``status``."""
    from fastapi.responses import JSONResponse

    code = int(status)
    body = {"error": {"message": message, "type": KINDS.get(code, "InternalServerError"), "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse(body, status_code=code, headers=headers)
