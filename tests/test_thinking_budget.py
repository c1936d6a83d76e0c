"""thinking_budget: after N tokens inside a thinking block the think-end token is forced;
outside thinking (and for rows without a budget) nothing is constrained."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import load_reference

from omlx.constrained import ThinkingBudget, for_request
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference

PROMPT = [11, 42, 97, 5, 230, 18, 64]


@pytest.fixture(scope="module")
def tiny(model_dir):
    model, tokenizer = load_reference(model_dir / "tiny")
    return model, tokenizer, tokenizer.think_start_tokens[0], tokenizer.think_end_tokens[0]


def generate(model, requests):
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=120), 4096)
    for r in requests:
        engine.add_request(r)
    out = {r.request_id: [] for r in requests}
    while engine.has_work:
        for rid, event in engine.step():
            if event.token_id is not None:
                out[rid].append(event.token_id)
    assert engine.blocks.leaked_blocks() == []
    return out


@pytest.mark.parametrize("budget", [0, 1, 5, 12])
def test_budget_closes_an_open_thinking_block(tiny, budget):
    model, tokenizer, start, end = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    prompt = PROMPT + [start]  # the template opened the block
    # Never ends thinking by itself: the think-end token is pushed down.
    params = SamplingParams(temperature=1.0, seed=budget, logit_bias={end: -100.0})
    constraint = ThinkingBudget(budget, [start], [end], starts_inside=True)
    out = generate(model, [
        GenerationRequest("b", prompt, budget + 10, params, eos, constraint=constraint),
        GenerationRequest("free", PROMPT, 10, stop_token_ids=eos),
    ])
    tokens = out["b"]
    assert end not in tokens[:budget]
    assert tokens[budget] == end
    assert end not in tokens[budget + 1 :]  # after the block nothing is forced
    assert out["free"] == greedy_reference(model, PROMPT, 10, eos)


def test_budget_counts_from_the_models_own_think_start(tiny):
    model, tokenizer, start, end = tiny
    # logit_bias makes every token <think>: the first opens the block, the next 4 are its
    # budget, then </think> is forced, and after it <think> is ordinary text again.
    params = SamplingParams(logit_bias={start: 100.0})
    constraint = for_request(tokenizer, thinking_budget=4, prompt_ids=PROMPT)
    assert isinstance(constraint, ThinkingBudget) and not constraint.starts_inside
    out = generate(model, [GenerationRequest("b", PROMPT, 10, params, constraint=constraint)])
    assert out["b"] == [start] * 5 + [end] + [start] * 4


def test_budget_inside_a_json_grammar(tiny):
    """With a schema, thinking is capped by the grammar itself and the answer validates."""
    model, tokenizer, start, end = tiny
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    constraint = for_request(tokenizer, response_format=fmt, thinking_budget=6, prompt_ids=PROMPT + [start])
    requests = [
        GenerationRequest(str(i), PROMPT + [start], 60, SamplingParams(temperature=1.0, seed=i), constraint=constraint)
        for i in range(3)
    ]
    for tokens in generate(model, requests).values():
        assert end in tokens and tokens.index(end) <= 6
        jsonschema.validate(json.loads(tokenizer.decode(tokens[tokens.index(end) + 1 :])), schema)


def test_chat_thinking_budget(client, server):
    tokenizer = load_reference(server.model_path("tiny"))[1]
    start, end = tokenizer.think_start_tokens[0], tokenizer.think_end_tokens[0]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "think about it"}], max_tokens=10,
        temperature=0, logit_bias={str(start): 100}, logprobs=True, extra_body={"thinking_budget": 3},
    )
    tokens = [entry.token for entry in r.choices[0].logprobs.content]
    assert tokens == ["<think>"] * 4 + ["</think>"] + ["<think>"] * 5


@pytest.mark.parametrize("budget", [-1, "many", 1.5])
def test_bad_thinking_budget_is_400(client, budget):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"thinking_budget": budget}
        )
    assert info.value.body["param"] == "thinking_budget"
