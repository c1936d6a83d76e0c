"""A request is validated once (issue #24): its own fields where the typed GenerationRequest is
made, its fit in the model's context and KV pool by the engine when the API builds it; the
engine then takes it as checked.  Whoever makes a request outside the API (a bench, the
distributed rank loop) still gets the same clear error, from the same single check."""

from __future__ import annotations

import pytest
from mlx_lm import load

from omlx.api.errors import APIError
from omlx.api.generation import build_request
from omlx.models.loaded import LoadedModel
from omlx.scheduler import AsyncEngine, EngineConfig, GenerationRequest, LLMEngine, RequestRejected, SamplingParams
from omlx.testing.tiny_models import TinyModelSpec, build_model

WINDOW = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(str(build_model(tmp_path_factory.mktemp("validation") / "m", TinyModelSpec(seed=5))))


def new_engine(model) -> LLMEngine:
    return LLMEngine(model, EngineConfig(block_size=16, num_blocks=16, max_num_batched_tokens=64), context_window=WINDOW)


@pytest.fixture
def served(tiny):
    """A LoadedModel over a real engine (its AsyncEngine thread stopped after the test)."""
    model, tokenizer = tiny
    engine = new_engine(model)
    async_engine = AsyncEngine(engine)
    yield LoadedModel(None, tokenizer, async_engine, engine.max_model_len, 0.0)
    async_engine.shutdown()


class CountingCheck:
    """Wraps an engine's `check` to count how often a request is checked."""

    def __init__(self, engine):
        self.inner = engine.check
        self.calls: list[str] = []
        engine.check = self

    def __call__(self, request):
        self.calls.append(request.request_id)
        return self.inner(request)


@pytest.mark.parametrize("fields, field, message", [
    (dict(prompt_token_ids=[]), "prompt", "empty"),
    (dict(max_tokens=0), "max_tokens", "at least 1"),
    (dict(n=0), "n", "at least one completion"),
    (dict(logprobs=-1), "logprobs", "0 or more"),
])
def test_a_request_no_engine_could_run_is_refused_where_it_is_made(fields, field, message):
    args = dict(request_id="r", prompt_token_ids=[1, 2, 3], max_tokens=4) | fields
    with pytest.raises(RequestRejected, match=message) as refused:
        GenerationRequest(**args)
    assert isinstance(refused.value, ValueError)
    assert refused.value.field == field and refused.value.code == "invalid_value"


def test_the_api_layer_turns_a_refused_field_into_its_400(served):
    with pytest.raises(APIError) as refused:
        build_request(served, [1, 2, 3], 4, SamplingParams(), "chatcmpl", n=0)
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "n", "invalid_value")


def test_a_prompt_too_long_is_refused_once_with_the_clients_parameter(served):
    counted = CountingCheck(served.engine.engine)
    with pytest.raises(APIError) as refused:
        build_request(served, [5] * WINDOW, None, SamplingParams(), "cmpl", prompt_param="prompt")
    error = refused.value
    assert (error.status, error.param, error.code) == (400, "prompt", "context_length_exceeded")
    assert f"maximum context length is {WINDOW} tokens" in error.message and f"has {WINDOW} tokens" in error.message
    assert len(counted.calls) == 1
    with pytest.raises(APIError) as too_many:
        build_request(served, [5] * 8, WINDOW + 1, SamplingParams(), "chatcmpl", max_tokens_param="max_completion_tokens")
    assert (too_many.value.param, too_many.value.code) == ("max_completion_tokens", "invalid_value")


def test_the_engine_takes_a_request_the_api_checked_without_checking_it_again(served):
    engine = served.engine.engine
    counted = CountingCheck(engine)
    request = build_request(served, [5, 6, 7, 8], 3, SamplingParams(), "chatcmpl")
    assert counted.calls == [request.request_id]
    engine.add_request(request)
    assert counted.calls == [request.request_id]  # add_request trusted the API's check
    tokens = []
    while engine.has_work:
        tokens += [e.token_id for _, e in engine.step() if e.token_id is not None]
    assert 1 <= len(tokens) <= 3


def test_a_check_by_another_engine_does_not_count(tiny):
    """The mark a check leaves names the engine that made it: a request checked against one
    model's engine is checked again by another's (its window or pool may differ)."""
    model, _ = tiny
    first, second = new_engine(model), new_engine(model)
    counted = CountingCheck(second)
    request = GenerationRequest("r", [5, 6, 7], 2)
    first.check_once(request)
    second.add_request(request)
    assert counted.calls == ["r"]


def test_a_request_made_outside_the_api_gets_the_same_clear_error(tiny):
    model, _ = tiny
    engine = new_engine(model)
    free = engine.blocks.num_free_blocks
    with pytest.raises(RequestRejected, match=f"maximum context length is {WINDOW} tokens") as refused:
        engine.add_request(GenerationRequest("long", [5] * WINDOW, 4))
    assert refused.value.field == "prompt" and refused.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected, match="whole KV cache"):
        small_pool = LLMEngine(model, EngineConfig(block_size=16, num_blocks=2, max_num_batched_tokens=64),
                               context_window=WINDOW)
        small_pool.add_request(GenerationRequest("big", [5] * 40, 20))
    assert not engine.sequences and not engine.has_work
    assert engine.blocks.num_free_blocks == free
