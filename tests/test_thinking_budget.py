"""thinking_budget: after N tokens inside a thinking block the think-end token is forced;
outside thinking (and for rows without a budget) nothing is constrained."""

from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import openai
import pytest
from conftest import load_reference

from omlx.constrained import ThinkingBudget, for_request
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

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
    # The tiny model never writes markup (see omlx.testing.tiny_models) and here cannot end:
    # only the budget can close the block.
    params = SamplingParams(temperature=1.0, seed=budget, logit_bias={t: -100.0 for t in eos})
    constraint = ThinkingBudget(budget, [start], [end], starts_inside=True)
    out = generate(model, [
        GenerationRequest("b", prompt, budget + 10, params, eos, constraint=constraint),
        GenerationRequest("free", PROMPT, 10, stop_token_ids=eos),
    ])
    tokens = out["b"]
    assert len(tokens) == budget + 10
    assert end not in tokens[:budget]
    assert tokens[budget] == end
    assert end not in tokens[budget + 1 :]  # after the block nothing is forced
    assert out["free"] == greedy_reference(model, PROMPT, 10, eos)


def test_budget_counts_from_the_models_own_think_start():
    """The state machine: the block opens at the model's think-start token, N tokens later
    only think-end is allowed, and after the block everything is allowed again."""
    start, end = 3, 4
    state = ThinkingBudget(2, [start], [end], starts_inside=False).new_state()

    def allowed() -> list[int] | None:
        if not state.active:
            return None
        row = np.zeros(1, dtype=np.int32)
        state.fill_bitmask(row)
        return [t for t in range(32) if row.view(np.uint32)[0] >> t & 1]

    for token in [10, 11, end, 12]:  # before any block: nothing forced, a stray end ignored
        assert allowed() is None
        state.accept(token)
    state.accept(start)
    for token in [20, 21]:
        assert allowed() is None
        state.accept(token)
    assert allowed() == [end]
    state.accept(end)
    for token in [start, 30, 31, 32, 33]:  # a second block is the model's own business
        assert allowed() is None
        state.accept(token)
    # A budget alone needs no grammar: for_request gives this light state machine.
    assert isinstance(for_request(_FakeThinkingTokenizer(), thinking_budget=2), ThinkingBudget)


class _FakeThinkingTokenizer:
    has_thinking = True
    think_start_tokens = (3,)
    think_end_tokens = (4,)

    def __len__(self) -> int:
        return 32


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


@pytest.fixture(scope="module")
def thinker(server):
    """A model served next to the others whose chat template opens a thinking block at the
    generation prompt (as Qwen3 and DeepSeek-R1 templates do): discovery picks it up."""
    name = "omlx-test-thinker"
    path = build_model(server.model_dir / name, TinyModelSpec(seed=5))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    opening = "{{- '<|im_start|>assistant\\n' }}"
    head, _, tail = config["chat_template"].rpartition(opening)
    config["chat_template"] = head + "{{- '<|im_start|>assistant\\n<think>\\n' }}" + tail
    config_path.write_text(json.dumps(config))
    yield name
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("budget", [0, 3])
def test_chat_thinking_budget(client, thinker, budget):
    r = client.chat.completions.create(
        model=thinker, messages=[{"role": "user", "content": "think about it"}], max_tokens=budget + 6,
        temperature=0, logprobs=True, extra_body={"thinking_budget": budget},
    )
    tokens = [entry.token for entry in r.choices[0].logprobs.content]
    assert "</think>" not in tokens[:budget]
    assert tokens[budget] == "</think>"


@pytest.mark.parametrize("budget", [-1, "many", 1.5])
def test_bad_thinking_budget_is_400(client, budget):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"thinking_budget": budget}
        )
    assert info.value.body["param"] == "thinking_budget"
