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
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

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
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str | None = None) -> web.Response:
        """The error reply; `path` picks the API family's shape (OpenAI unless Anthropic's)."""
        body = self.anthropic_body() if path is not None and is_anthropic_route(path) else self.body()
        return web.Response(body=orjson.dumps(body), status=self.status, content_type="application/json")


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
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
