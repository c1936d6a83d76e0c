"""GET /openapi.json: an OpenAPI 3.1 document of every route the server has.

The paths and methods come from the app's router, so a route added anywhere appears here
without being listed twice.  Request bodies are JSON Schemas built from what the protocol
parsers check: their field names, their limits (the sampling ranges of each family, `n`,
stop strings, logprobs, roles) are imported from the parser modules, not restated; fields the
parsers ignore are allowed (`additionalProperties`), as clients send many.  The error
responses are each family's error shape (omlx.api.errors).  A fuzzing test
(tests/test_api_fuzzing.py) runs schemathesis against a live server from this document.
"""

from __future__ import annotations

import copy
import re

from aiohttp import web

from omlx import __version__
from omlx.models.pool import ModelPool

from .anthropic_protocol import MAX_STOP_SEQUENCES
from .embeddings import MAX_INPUTS
from .rerank import MAX_CHUNKS_PER_DOC, MAX_DOCUMENTS
from .errors import is_anthropic_route
from .openai_protocol import MAX_N, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, ROLES
from .responses_protocol import _MESSAGE_ROLES
from .sampling_fields import ANTHROPIC_RANGES, INTEGER_FIELDS, OPENAI_RANGES

MAX_TOKENS = 2**31 - 1
STRING_OR_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def _sampling(ranges: dict[str, tuple]) -> dict:
    out = {}
    for name, (lo, hi) in ranges.items():
        kind = "integer" if name in INTEGER_FIELDS else "number"
        out[name] = {"type": [kind, "null"], "minimum": lo, "maximum": hi}
    return out


def _text_parts(part_types: list[str]) -> dict:
    return {"type": "array", "items": {"type": "object", "required": ["type"],
                                       "properties": {"type": {"type": "string", "enum": part_types},
                                                      "text": {"type": "string"}}}}


_TOOL_PARAMETERS = {"type": "object"}
_CHAT_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "parameters": _TOOL_PARAMETERS}}}}
_RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "required": ["name", "schema"],
                    "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                                   "strict": {"type": ["boolean", "null"]}}}}}
_COMMON_OPENAI = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS},
    "stop": {"anyOf": [{"type": "null"}, {"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS}]},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
    "logit_bias": {"type": ["object", "null"], "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    **_sampling(OPENAI_RANGES),
}

CHAT = {"type": "object", "required": ["model", "messages"], "properties": {
    **_COMMON_OPENAI,
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": sorted(ROLES)},
        "content": {"anyOf": [{"type": "null"}, {"type": "string"}, _text_parts(["text", "image_url"])]},
        "name": {"type": "string"}, "tool_call_id": {"type": "string"}}}},
    "logprobs": {"type": ["boolean", "null"]},
    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    "tools": {"type": ["array", "null"], "items": _CHAT_TOOL},
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}]},
    "response_format": {"anyOf": [_RESPONSE_FORMAT, {"type": "null"}]},
    "chat_template_kwargs": {"type": ["object", "null"]},
}}

COMPLETIONS = {"type": "object", "required": ["model", "prompt"], "properties": {
    **_COMMON_OPENAI,
    "prompt": {"anyOf": [{"type": "string"},
                         {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
    "echo": {"type": ["boolean", "null"]},
    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
}}

MESSAGES = {"type": "object", "required": ["model", "messages", "max_tokens"], "properties": {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, _text_parts(["text"])]}}}},
    "system": {"anyOf": [{"type": "string"}, _text_parts(["text"])]},
    "stop_sequences": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES},
    "stream": {"type": "boolean"},
    "tools": {"type": "array", "items": {"type": "object", "required": ["name", "input_schema"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "input_schema": _TOOL_PARAMETERS}}},
    "tool_choice": {"type": "object", "required": ["type"],
                    "properties": {"type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"}}},
    "thinking": {"type": "object", "properties": {"type": {"enum": ["enabled", "disabled", "adaptive"]},
                                                  "budget_tokens": {"type": "integer", "minimum": 0}}},
    **_sampling(ANTHROPIC_RANGES),
}}

COUNT_TOKENS = {**MESSAGES, "required": ["model", "messages"]}

RESPONSES = {"type": "object", "required": ["model", "input"], "properties": {
    "model": {"type": "string", "minLength": 1},
    "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
        "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
        "role": {"enum": sorted(_MESSAGE_ROLES)},
        "content": {"anyOf": [{"type": "string"}, _text_parts(["input_text", "output_text"])]}}}}]},
    "instructions": {"type": ["string", "null"]},
    "previous_response_id": {"type": ["string", "null"]},
    "max_output_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS},
    "stream": {"type": ["boolean", "null"]},
    "store": {"type": ["boolean", "null"]},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "tools": {"type": ["array", "null"], "items": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string"}, "name": {"type": "string"}, "parameters": _TOOL_PARAMETERS}}},
    "metadata": {"type": ["object", "null"]},
    **_sampling(OPENAI_RANGES),
}}

EMBEDDINGS = {"type": "object", "required": ["input"], "properties": {
    "model": {"type": "string"},
    "input": {"anyOf": [{"type": "string"},
                        {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": {"type": "string"}},
                        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
    "encoding_format": {"enum": ["float", "base64"]},
    "dimensions": {"type": "integer", "minimum": 1},
}}

_RERANK_TEXT = {"anyOf": [{"type": "string"}, {"type": "object", "required": ["text"],
                                                "properties": {"text": {"type": "string"}}}]}
RERANK = {"type": "object", "required": ["query", "documents"], "properties": {
    "model": {"type": "string"},
    "query": _RERANK_TEXT,
    "documents": {"type": "array", "minItems": 1, "maxItems": MAX_DOCUMENTS, "items": _RERANK_TEXT},
    "top_n": {"type": ["integer", "null"], "minimum": 1},
    "return_documents": {"type": ["boolean", "null"]},
    "max_chunks_per_doc": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CHUNKS_PER_DOC},
    "max_tokens_per_doc": {"type": ["integer", "null"], "minimum": 1},
    "instruction": {"type": ["string", "null"]},  # LLM rerankers only
}}

# POST bodies by route; routes not named here take any JSON object (or none).
REQUEST_BODIES = {
    "/v1/chat/completions": CHAT, "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/messages": MESSAGES, "/v1/messages/count_tokens": COUNT_TOKENS,
    "/v1/responses": RESPONSES, "/responses": RESPONSES,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK, "/rerank": RERANK, "/v2/rerank": RERANK,
    # oMLX's MCP execute: `tool` is accepted for `tool_name`; the arguments are checked
    # against the tool's own input schema by the route.
    "/v1/mcp/execute": {"type": "object", "properties": {
        "tool_name": {"type": "string", "minLength": 1}, "tool": {"type": "string", "minLength": 1},
        "arguments": {"type": ["object", "null"]}}},
}

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}

# What any route may answer besides success: bad input, auth, unknown model or route, a stalled
# body, a conflict, too large, throttled, an upstream (the hub) failing, overload, memory; 500
# appears only for a model that fails to load (or a tokenizer that fails mid-request).
ERROR_STATUSES = ("400", "401", "403", "404", "405", "408", "409", "413", "429", "500", "502", "503", "504", "507")


class OpenAPIRoute:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_get("/openapi.json", self.document)

    async def document(self, request: web.Request) -> web.Response:
        models = {kind: [m.model_id for m in self.pool.servable(kind)] for kind in ("llm", "embedding", "reranker")}
        return web.json_response(openapi_document(request.app, models))


def openapi_document(app: web.Application, models: dict[str, list[str]] | None = None) -> dict:
    """The document; `models` ({"llm": [...], "embedding": [...], "reranker": [...]}) names the
    served models."""
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        method = route.method.lower()
        if method in ("head", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or _template(info.get("formatter", ""))
        # The admin panel's own routes (its page, login, log stream, downloader) serve the
        # panel, not API clients: not part of the documented API.
        if not path or path == "/openapi.json" or path == "/admin" or path.startswith("/admin/"):
            continue
        paths.setdefault(path, {})[method] = _operation(path, method, models or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "omlx", "version": __version__,
                 "description": "OpenAI- and Anthropic-compatible inference server on MLX."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {"OpenAIError": OPENAI_ERROR, "AnthropicError": ANTHROPIC_ERROR}},
    }


def _template(formatter: str) -> str:
    """aiohttp's `{name:regex}` placeholders as OpenAPI's `{name}`."""
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", formatter)


# The kind of model a route's `model` names (the rest take LLMs).
_MODEL_KIND = {"/v1/embeddings": "embedding", "/v1/rerank": "reranker", "/rerank": "reranker", "/v2/rerank": "reranker"}


def _operation(path: str, method: str, models: dict[str, list[str]]) -> dict:
    error_shape = "AnthropicError" if is_anthropic_route(path) else "OpenAIError"
    error = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_shape}"}}}}
    statuses = ERROR_STATUSES + (("529",) if is_anthropic_route(path) else ())
    operation: dict = {
        "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_') or 'root'}",
        "responses": {"200": {"description": "success",
                              "content": {"application/json": {}, "text/event-stream": {}, "text/plain": {},
                                          "text/html": {}}},
                      **{status: {"description": "error", **error} for status in statuses}},
    }
    names = re.findall(r"\{(\w+)\}", path)
    if names:
        operation["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                                   for n in names]
    if method in ("post", "put"):
        schema = REQUEST_BODIES.get(path, {"type": "object"})
        served = models.get(_MODEL_KIND.get(path, "llm"))
        if served and "model" in schema.get("properties", {}):
            schema = copy.deepcopy(schema)
            schema["properties"]["model"] = {"enum": served}
        operation["requestBody"] = {"required": path in REQUEST_BODIES,
                                    "content": {"application/json": {"schema": schema}}}
    return operation

