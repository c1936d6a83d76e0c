"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from omlx.models.pool import ModelNotFound, ModelPool

from . import sse
from . import chat_tools
from .assistant_turn import AssistantTurn
from .errors import model_not_found
from .generation import EngineFailure, GenerationStream, collect_choices
from .logprobs import chat_logprobs, completion_logprobs
from .offload import offload
from .openai_protocol import parse_chat, parse_completion
from .serving import Serving
from .server_tools import offer_mcp_tools
from .server_tools_chat import chat_with_server_tools
from .turn_request import TurnRequest
from .wire import dumps as _dumps
from .wire import read_json

log = logging.getLogger("omlx.api.openai")


def _usage_dict(stream: GenerationStream) -> dict:
    usage = stream.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": usage.accepted_prediction_tokens,
            "rejected_prediction_tokens": usage.rejected_prediction_tokens,
        },
    }


class OpenAIRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.serving = Serving(pool)

    def register(self, app: web.Application) -> None:
        # The mlx-vlm server's routes have no /v1 prefix; its clients use them as they are.
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self.chat_completions)
            app.router.add_get(f"{prefix}/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models/{model_id:.+}", self.get_model)

    # ------------------------------------------------------------------ models
    def _model_card(self, info) -> dict:
        """oMLX's card: the id is the model's alias when one is set (requests may use either)."""
        owner = "omlx-demo" if info.model_id == self.pool.demo_model_id else "omlx"
        created = int(info.path.stat().st_mtime) if info.path.exists() else 0
        alias = self.pool.settings.model(info.model_id).get("alias")
        return {"id": alias or info.model_id, "object": "model", "created": created, "owned_by": owner}

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
        body = await read_json(request)
        offer = offer_mcp_tools(request.app, body, "chat")
        turn = await offload(parse_chat, offer.body if offer else body, size=request.content_length)
        running = await self.serving.start(request, turn)
        if offer is not None:
            return await chat_with_server_tools(request, running, offer.run(self.serving, request, running))
        stream, turn, loaded = running.stream, running.turn, running.loaded
        if running.request.stream:
            return await self._stream_chat(request, stream, running.request, turn)
        await collect_choices(stream)
        logprobs = running.request.logprobs is not None
        return web.json_response(
            {
                "id": stream.request.request_id,
                "object": "chat.completion",
                "created": stream.created,
                "model": loaded.model_id,
                "choices": [
                    {
                        "index": c.index,
                        "message": chat_tools.message(turn, c),
                        "logprobs": chat_logprobs(loaded.tokenizer, c.logprobs) if logprobs else None,
                        "finish_reason": turn.finish_reason(c.index),
                    }
                    for c in stream.choices
                ],
                "usage": _usage_dict(stream),
            },
            dumps=_dumps,
        )

    async def _stream_chat(self, request, stream: GenerationStream, options: TurnRequest, turn: AssistantTurn):
        tokenizer = stream.loaded.tokenizer

        def chunk(delta: dict, finish_reason=None, index: int = 0, logprobs=None) -> dict:
            return {
                "id": stream.request.request_id,
                "object": "chat.completion.chunk",
                "created": stream.created,
                "model": stream.loaded.model_id,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            }

        response = await sse.open_stream(request)
        for c in stream.choices:
            await response.write(sse.data_event(chunk({"role": "assistant", "content": ""}, index=c.index)))
        # Choices interleave in the order their tokens come out of the engine.
        # While nothing comes (a long prefill, a wait in the queue): an empty delta, which
        # clients skip but count as an event (Codex's idle timer ignores SSE comments).
        ping = sse.data_event(chunk({}))
        async for c, delta in _guarded_choices(stream, request, response, ping):
            logprobs = None
            if options.logprobs is not None:
                entries = c.take_logprobs()
                logprobs = chat_logprobs(tokenizer, entries) if entries else None
            deltas = chat_tools.stream_deltas(turn, c, delta)
            if logprobs and not deltas:
                deltas = [{"content": ""}]  # text held back by the output parser; logprobs go now
            for i, out in enumerate(deltas):
                await response.write(sse.data_event(chunk(out, None, c.index, logprobs if i == 0 else None)))
            if c.finish_reason is not None:
                await response.write(sse.data_event(chunk({}, turn.finish_reason(c.index), c.index)))
        if all(c.finish_reason is not None for c in stream.choices):
            if options.include_usage:
                final = chunk({})
                final["choices"] = []
                final["usage"] = _usage_dict(stream)
                await response.write(sse.data_event(final))
            await response.write(sse.DONE)
        return response

    # ------------------------------------------------------------------ completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = await offload(parse_completion, await read_json(request), size=request.content_length)
        running = await self.serving.start(request, parsed.turn)
        stream, loaded = running.stream, running.loaded
        prompt = parsed.turn.prompt
        prompt_text = prompt if isinstance(prompt, str) else loaded.tokenizer.decode(running.prompt_ids)
        echo = prompt_text if parsed.echo else ""

        logprobs = parsed.turn.logprobs is not None

        def choice(text: str, finish_reason=None, index: int = 0, entries=None, offset: int = 0) -> dict:
            lp = completion_logprobs(loaded.tokenizer, entries, offset) if logprobs and entries is not None else None
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

        def body(choices: list) -> dict:
            return {
                "id": stream.request.request_id,
                "object": "text_completion",
                "created": stream.created,
                "model": loaded.model_id,
                "choices": choices,
            }

        if not parsed.turn.stream:
            await collect_choices(stream)
            result = body(
                [choice(echo + c.text.text, c.finish_reason, c.index, c.logprobs, len(echo)) for c in stream.choices]
            )
            result["usage"] = _usage_dict(stream)
            return web.json_response(result, dumps=_dumps)

        response = await sse.open_stream(request)
        if echo:
            for c in stream.choices:
                await response.write(sse.data_event(body([choice(echo, index=c.index)])))
        offsets = [len(echo)] * len(stream.choices)
        ping = sse.data_event(body([choice("")]))  # an empty text delta: see _stream_chat
        async for c, delta in _guarded_choices(stream, request, response, ping):
            entries = c.take_logprobs() if logprobs else None
            if delta or entries:
                await response.write(sse.data_event(body([choice(delta, None, c.index, entries, offsets[c.index])])))
                offsets[c.index] += len(delta)
            if c.finish_reason is not None:
                await response.write(sse.data_event(body([choice("", c.finish_reason, c.index)])))
        if all(c.finish_reason is not None for c in stream.choices):
            if parsed.turn.include_usage:
                final = body([])
                final["usage"] = _usage_dict(stream)
                await response.write(sse.data_event(final))
            await response.write(sse.DONE)
        return response


async def _guarded_choices(stream: GenerationStream, request: web.Request, response: web.StreamResponse,
                           ping: bytes):
    """`(choice, delta)` pairs of a stream that has already sent its headers: `ping` is
    written whenever nothing came for the keepalive interval, and an engine failure becomes
    an error event in the stream instead of an exception aiohttp would turn into a broken
    reply."""
    try:
        async with aclosing(sse.with_keepalive(stream.choice_deltas(), sse.keepalive_interval(request))) as items:
            async for item in items:
                if item is None:
                    await response.write(sse.progress_comment(request) + ping)
                else:
                    yield item
    except EngineFailure as exc:
        error = exc.api_error()
        await response.write(sse.data_event(error.body()))

