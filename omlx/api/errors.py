"""API errors with a 4xx/5xx status, in the shape of the API family the route belongs to.

OpenAI: `{"error": {"message", "type", "param", "code"}}`.
Anthropic (/v1/messages...): `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import orjson
from aiohttp import web


class APIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        anthropic_status: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # Where Anthropic's API answers with another status than OpenAI's (overload: 529).
        self.anthropic_status = anthropic_status

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict:
        status = self.anthropic_status or self.status
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str | None = None) -> web.Response:
        """The error reply; `path` picks the API family's shape (OpenAI unless Anthropic's)."""
        if path is not None and is_anthropic_route(path):
            body, status = self.anthropic_body(), self.anthropic_status or self.status
        else:
            body, status = self.body(), self.status
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                            headers=self.headers)


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_route(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return APIError(
        f"The model '{model}' does not exist or is not available on this server.",
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def overloaded(message: str, retry_after_s: float, code: str = "overloaded") -> APIError:
    """The server is at capacity: 503 with OpenAI's `code: overloaded`, 529 `overloaded_error`
    on Anthropic's routes (what vLLM, TGI and Anthropic's own API answer), with Retry-After
    so that SDKs that retry wait as told instead of hammering."""
    return APIError(message, 503, "server_error", None, code,
                    headers={"Retry-After": str(max(1, round(retry_after_s)))}, anthropic_status=529)


def shutting_down(message: str = "the server is shutting down; retry against its next start") -> APIError:
    return APIError(message, 503, "server_error", None, "server_shutting_down", anthropic_status=529)
