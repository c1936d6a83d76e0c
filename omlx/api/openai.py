"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging

from aiohttp import web

from omlx.models.pool import ModelNotFound, ModelPool

from . import sse
from . import chat_tools
from .assistant_turn import ChoiceStep, TextTurn
from .chat_events import ChatEvents, chat_usage
from .errors import model_not_found
from .generation import EngineFailure, Usage, collect_choices
from .logprobs import chat_logprobs, completion_logprobs
from .offload import offload
from .openai_protocol import parse_chat, parse_completion
from .serving import Serving
from .server_tools import offer_mcp_tools
from .server_tools_chat import chat_with_server_tools
from .sse_pump import pump
from .wire import dumps as _dumps
from .wire import read_json

log = logging.getLogger("omlx.api.openai")


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
            return await self._stream_chat(request, running)
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
                "usage": chat_usage(stream.usage),
            },
            dumps=_dumps,
        )

    async def _stream_chat(self, request, running):
        stream = running.stream
        fmt = ChatEvents(running.turn, stream.request.request_id, stream.created, running.loaded.model_id,
                         len(stream.choices), running.loaded.tokenizer,
                         logprobs=running.request.logprobs is not None, include_usage=running.request.include_usage)
        return await pump(request, running.turn, fmt)

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
            result["usage"] = chat_usage(stream.usage)
            return web.json_response(result, dumps=_dumps)

        turn = TextTurn(stream)
        fmt = _CompletionEvents(turn, body, choice, echo, len(stream.choices), parsed.turn.include_usage)
        return await pump(request, turn, fmt)


class _CompletionEvents:
    """sse_pump's EventFormat for text completions (`text_completion` chunks)."""

    def __init__(self, turn: TextTurn, body, choice, echo: str, n: int, include_usage: bool):
        self.turn = turn
        self.body, self.choice, self.echo, self.include_usage = body, choice, echo, include_usage
        self.offsets = [len(echo)] * n  # where each choice's next text starts, for logprobs

    def opening(self) -> bytes:
        if not self.echo:
            return b""
        return b"".join(sse.data_event(self.body([self.choice(self.echo, index=i)])) for i in range(len(self.offsets)))

    def keepalive(self) -> bytes:
        return sse.data_event(self.body([self.choice("")]))  # an empty text delta: see ChatEvents

    def step(self, step: ChoiceStep) -> bytes:
        out = []
        text = "".join(event.text for event in step.events)
        if text or step.logprobs:
            chunk = self.choice(text, None, step.index, step.logprobs, self.offsets[step.index])
            out.append(sse.data_event(self.body([chunk])))
            self.offsets[step.index] += len(text)
        if step.finished:
            out.append(sse.data_event(self.body([self.choice("", self.turn.finish_reason(step.index), step.index)])))
        return b"".join(out)

    async def closing(self, usage: Usage) -> bytes:
        out = []
        if self.include_usage:
            final = self.body([])
            final["usage"] = chat_usage(usage)
            out.append(sse.data_event(final))
        return b"".join(out) + sse.DONE

    def failure(self, exc: EngineFailure) -> bytes:
        return sse.data_event(exc.api_error().body())
