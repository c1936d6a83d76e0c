"""The one path every generating API family takes from a typed request to a running turn.

    TurnRequest ─► lease the model (its LoRA adapter entry, if asked) ─► apply the defaults
    ─► render the prompt ─► output limit ─► decoding constraint ─► engine submission
    ─► GenerationStream (text, usage) + AssistantTurn (reasoning, tool calls)

Each family's route parses its wire format into a TurnRequest, calls `start`, and only
formats what comes out (JSON or its SSE events).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from omlx.models.loaded import LoadedModel
from omlx.models.pool import ModelPool
from omlx.serving_limits import limits_of

from .admission import admit, check_memory
from .assistant_turn import AssistantTurn
from .conversation import prompt_ids_within
from .errors import invalid
from .generation import GenerationStream, build_request
from .sse import GENERATION_KEY
from .image_prompt import check_takes_images, image_prompt
from .model_access import lease_for_request
from .offload import offload
from .prompt_bound import longest_token_chars
from .turn_options import decoding_constraint, output_room, tool_parser_of
from .turn_request import ModelDefaults, Resolved, TurnRequest, apply_defaults


@dataclass
class RunningTurn:
    loaded: LoadedModel
    resolved: Resolved
    prompt_ids: list[int]
    stream: GenerationStream
    turn: AssistantTurn | None  # None for text completions: no reasoning or tool parsing

    @property
    def request(self) -> TurnRequest:
        return self.resolved.request


class Serving:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def defaults(self, loaded: LoadedModel) -> ModelDefaults:
        # The settings' one precedence (omlx.settings_typed), with an OCR family's sampling,
        # stops and length under the model's own settings.
        ocr = getattr(loaded.vision, "ocr", None)
        found = self.pool.settings.defaults(loaded.info.settings_id, ocr.request_layer() if ocr is not None else None)
        return ModelDefaults(
            sampling=dict(found.sampling), max_tokens=found.max_tokens, template_kwargs=dict(found.template_kwargs),
            forced_template_kwargs=found.forced_template_kwargs, thinking_budget=found.thinking_budget,
            stop=list(found.stop) if found.stop is not None else None, forced_sampling=found.forced_sampling,
        )

    async def prepare(self, http: web.Request, request: TurnRequest):
        """Lease the model, apply its defaults and render the prompt (also all that
        /v1/messages/count_tokens needs): (model, resolved request, prompt ids, its images
        as the engine takes them or None)."""
        loaded = await lease_for_request(http, self.pool, request.model, adapter_path=request.adapter_path)
        resolved = apply_defaults(request, self.defaults(loaded))
        check_takes_images(loaded, request)
        # Rendering and tokenizing scale with the body: off the event loop, in the lane its
        # size picks (None, a chunked body: the large lane).
        size = http.content_length
        if loaded.takes_images and request.conversation is not None:
            limits = limits_of(http.app)
            prompt_ids, multimodal = await image_prompt(loaded, request, limits.images, size, audio_limits=limits.audio)
            return loaded, resolved, prompt_ids, multimodal
        return loaded, resolved, await offload(self._prompt_ids, loaded, request, size=size), None

    async def start(self, http: web.Request, request: TurnRequest) -> RunningTurn:
        check_memory(http)
        loaded, resolved, prompt_ids, multimodal = await self.prepare(http, request)
        tool_parser = tool_parser_of(self.pool, loaded)
        constraint = None
        if request.conversation is not None:
            # Grammar compilation (and, once per model, the grammar engine's tokenizer) runs
            # off the event loop.
            constraint = await offload(
                decoding_constraint, loaded, request.conversation, request.response_format,
                resolved.thinking_budget, prompt_ids, tool_parser, request.format_param,
                size=http.content_length,
            )
        predicted_ids = ()
        if request.prediction:
            predicted_ids = await offload(self._predicted_ids, loaded, request.prediction,
                                          size=len(request.prediction))
        engine_request = build_request(
            loaded, prompt_ids, self._max_tokens(loaded, resolved, len(prompt_ids)), resolved.sampling,
            request.id_prefix, request.max_tokens_param, request.prompt_param,
            logprobs=request.logprobs, n=request.n, constraint=constraint, multimodal=multimodal,
            speculative=request.speculative is not False,
            predicted_token_ids=predicted_ids,
        )
        admit(http, self.pool, loaded, engine_request.request_id)
        stream = GenerationStream(loaded, engine_request, resolved.stop, self.pool.metrics)
        http[GENERATION_KEY] = stream  # the newest turn's: its prefill progress goes in keepalives
        turn = None
        if request.conversation is not None:
            turn = AssistantTurn(stream, prompt_ids, request.conversation, tool_parser, request.call_id_prefix)
        return RunningTurn(loaded, resolved, prompt_ids, stream, turn)

    @staticmethod
    def _prompt_ids(loaded: LoadedModel, request: TurnRequest) -> list[int]:
        """CPU work (run it in the offload pool); a prompt that cannot fit the context is
        refused before it is tokenized in full (omlx.api.prompt_bound)."""
        window = loaded.context_window
        if request.conversation is not None:
            return prompt_ids_within(loaded.tokenizer, request.conversation, window, request.prompt_param)
        if isinstance(request.prompt, str):
            return prompt_ids_within(loaded.tokenizer, request.prompt, window, request.prompt_param)
        if len(request.prompt) >= window:
            return list(request.prompt)  # build_request refuses it, with its length
        vocab = len(loaded.tokenizer)
        if max(request.prompt) >= vocab:
            raise invalid(f"'prompt' has token ids outside the vocabulary (size {vocab})", "prompt", "invalid_value")
        return list(request.prompt)

    @staticmethod
    def _predicted_ids(loaded: LoadedModel, prediction: str) -> list[int]:
        """A prediction's tokens (CPU work: run it in the offload pool).  Drafts never go
        past the context, so text beyond what the window could hold is not tokenized."""
        usable = loaded.context_window * longest_token_chars(loaded.tokenizer)
        return loaded.tokenizer.encode(prediction[:usable], add_special_tokens=False)

    @staticmethod
    def _max_tokens(loaded: LoadedModel, resolved: Resolved, prompt_tokens: int) -> int | None:
        """The output limit: a client's own limit is checked against the context (a 400 if it
        cannot fit) unless its API caps it; a configured default is always capped, since a
        server setting must never fail a client's request."""
        max_tokens = resolved.max_tokens
        if max_tokens is not None and (resolved.max_tokens_from_default or resolved.request.cap_max_tokens):
            max_tokens = min(max_tokens, max(1, output_room(loaded, prompt_tokens)))
        return max_tokens
