"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from omlx.models.pool import LoadedModel, ModelNotFound, ModelPool

from . import sse
from .errors import APIError, invalid, model_not_found
from .generation import EngineFailure, GenerationStream, build_request, collect
from .openai_protocol import CommonOptions, parse_chat, parse_completion

log = logging.getLogger("omlx.api.openai")


async def read_json(request: web.Request):
    raw = await request.read()
    if not raw:
        raise invalid("the request body is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None


def _usage_dict(stream: GenerationStream) -> dict:
    usage = stream.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class OpenAIRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model_id:.+}", self.get_model)

    async def _loaded(self, model_id: str) -> LoadedModel:
        try:
            return await self.pool.get(model_id)
        except ModelNotFound:
            raise model_not_found(model_id) from None

    # ------------------------------------------------------------------ models
    def _model_card(self, info) -> dict:
        owner = "omlx-demo" if info.model_id == self.pool.demo_model_id else "omlx"
        created = int(info.path.stat().st_mtime) if info.path.exists() else 0
        return {"id": info.model_id, "object": "model", "created": created, "owned_by": owner}

    async def list_models(self, request: web.Request) -> web.Response:
        self.pool.rescan()
        data = [self._model_card(m) for m in self.pool.servable()]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        try:
            info = self.pool.resolve(model_id)
        except ModelNotFound:
            raise model_not_found(model_id) from None
        return web.json_response(self._model_card(info), dumps=_dumps)

    # ------------------------------------------------------------------ chat
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await read_json(request))
        loaded = await self._loaded(parsed.options.model)
        try:
            prompt_ids = loaded.tokenizer.apply_chat_template(
                parsed.messages, add_generation_prompt=True, tokenize=True, **parsed.chat_template_kwargs
            )
        except Exception as exc:  # the model's own template rejected these messages
            raise invalid(f"the chat template could not render these messages: {exc}", "messages") from None
        stream = self._start(loaded, prompt_ids, parsed.options, "chatcmpl")
        if parsed.options.stream:
            return await self._stream_chat(request, stream, parsed.options)
        text = await collect(stream)
        return web.json_response(
            {
                "id": stream.request.request_id,
                "object": "chat.completion",
                "created": stream.created,
                "model": loaded.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": stream.finish_reason,
                    }
                ],
                "usage": _usage_dict(stream),
            },
            dumps=_dumps,
        )

    async def _stream_chat(self, request, stream: GenerationStream, options: CommonOptions):
        def chunk(delta: dict, finish_reason=None) -> dict:
            return {
                "id": stream.request.request_id,
                "object": "chat.completion.chunk",
                "created": stream.created,
                "model": stream.loaded.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        response = await sse.open_stream(request)
        await response.write(sse.data_event(chunk({"role": "assistant", "content": ""})))
        async for delta in _guarded(stream, response):
            await response.write(sse.data_event(chunk({"content": delta})))
        if stream.finish_reason is not None:
            await response.write(sse.data_event(chunk({}, stream.finish_reason)))
            if options.include_usage:
                final = chunk({})
                final["choices"] = []
                final["usage"] = _usage_dict(stream)
                await response.write(sse.data_event(final))
            await response.write(sse.DONE)
        return response

    # ------------------------------------------------------------------ completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await read_json(request))
        loaded = await self._loaded(parsed.options.model)
        if isinstance(parsed.prompt, str):
            prompt_ids = loaded.tokenizer.encode(parsed.prompt)
            prompt_text = parsed.prompt
        else:
            vocab = len(loaded.tokenizer)
            if max(parsed.prompt) >= vocab:
                raise invalid(f"'prompt' has token ids outside the vocabulary (size {vocab})", "prompt", "invalid_value")
            prompt_ids = parsed.prompt
            prompt_text = loaded.tokenizer.decode(prompt_ids)
        stream = self._start(loaded, prompt_ids, parsed.options, "cmpl")
        echo = prompt_text if parsed.echo else ""

        def choice(text: str, finish_reason=None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        def body(choices: list) -> dict:
            return {
                "id": stream.request.request_id,
                "object": "text_completion",
                "created": stream.created,
                "model": loaded.model_id,
                "choices": choices,
            }

        if not parsed.options.stream:
            text = await collect(stream)
            result = body([choice(echo + text, stream.finish_reason)])
            result["usage"] = _usage_dict(stream)
            return web.json_response(result, dumps=_dumps)

        response = await sse.open_stream(request)
        if echo:
            await response.write(sse.data_event(body([choice(echo)])))
        async for delta in _guarded(stream, response):
            await response.write(sse.data_event(body([choice(delta)])))
        if stream.finish_reason is not None:
            await response.write(sse.data_event(body([choice("", stream.finish_reason)])))
            if parsed.options.include_usage:
                final = body([])
                final["usage"] = _usage_dict(stream)
                await response.write(sse.data_event(final))
            await response.write(sse.DONE)
        return response

    def _start(self, loaded, prompt_ids, options: CommonOptions, prefix: str) -> GenerationStream:
        request = build_request(
            loaded, prompt_ids, options.max_tokens, options.sampling, prefix, options.max_tokens_param,
            prompt_param="prompt" if prefix == "cmpl" else "messages",
        )
        return GenerationStream(loaded, request, options.stop)


async def _guarded(stream: GenerationStream, response: web.StreamResponse):
    """Text deltas of a stream that has already sent its headers: an engine failure becomes an
    error event in the stream instead of an exception aiohttp would turn into a broken reply."""
    try:
        async for delta in stream:
            yield delta
    except EngineFailure as exc:
        error = APIError(str(exc), 500, "server_error", None, "engine_error")
        await response.write(sse.data_event(error.body()))


def _dumps(obj) -> str:
    return orjson.dumps(obj).decode()
