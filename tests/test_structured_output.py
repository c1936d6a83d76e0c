"""Grammar-constrained decoding: response_format json_object / json_schema always yields JSON
that parses and validates (even with a random model sampling at temperature 1, even when
max_tokens is tight), constrained and free requests share batches without changing the free
ones' tokens, and bad schemas get a 400."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from conftest import chat_prompt_ids, decode, load_reference, reference_greedy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.constrained import allowed_tokens, for_request
from omlx.constrained.grammar import CLOSING_MARGIN
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "maxLength": 10}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "address"],
}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def answer_json(text: str):
    """The JSON answer of a completion (after any thinking block the model opened)."""
    return json.loads(text.split("</think>")[-1])


@pytest.fixture(scope="module")
def tiny(model_dir):
    model, tokenizer = load_reference(model_dir / "tiny")
    engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=600, max_num_batched_tokens=256), 4096)
    return model, tokenizer, engine


def run(engine, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], str]]:
    for r in requests:
        engine.add_request(r)
    tokens = {r.request_id: [] for r in requests}
    finish = {}
    while engine.has_work:
        for request_id, event in engine.step():
            if event.token_id is not None:
                tokens[request_id].append(event.token_id)
            if event.finish_reason is not None:
                finish[request_id] = event.finish_reason.value
    assert engine.blocks.leaked_blocks() == []
    return {rid: (tokens[rid], finish[rid]) for rid in tokens}


# ---------------------------------------------------------------------------- engine


def test_constrained_and_free_rows_share_a_batch(tiny):
    model, tokenizer, engine = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format=json_format(PERSON))
    prompts = [[11, 42, 97, 5, 230], [18, 64, 301, 77], [400, 3, 9, 120, 33, 7]]
    requests = [
        GenerationRequest(f"json{i}", prompts[i % 3], 200, SamplingParams(temperature=1.0, seed=i), eos, constraint=constraint)
        for i in range(6)
    ] + [GenerationRequest(f"free{i}", p, 24, stop_token_ids=eos) for i, p in enumerate(prompts)]
    results = run(engine, requests)
    for i in range(6):
        tokens, finish = results[f"json{i}"]
        assert finish == "stop"  # the grammar completed
        jsonschema.validate(answer_json(tokenizer.decode(tokens)), PERSON)
    for i, p in enumerate(prompts):  # free greedy rows: token-exact with mlx-lm alone
        assert results[f"free{i}"][0] == greedy_reference(model, p, 24, eos)


SMALL = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}}, "required": ["name", "city"]}


@pytest.mark.parametrize("schema, max_tokens", [(SMALL, 34), (SMALL, 48), (PERSON, 100), (PERSON, 130)])
def test_tight_max_tokens_still_closes_the_json(tiny, schema, max_tokens):
    """The budget runs out mid-string: the grammar plans and forces a short ending in time.
    Guaranteed whenever max_tokens leaves room for the shortest document (+ a margin)."""
    _, tokenizer, engine = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format=json_format(schema))
    assert constraint.skeleton + CLOSING_MARGIN <= max_tokens
    requests = [
        GenerationRequest(f"t{i}", [5 + i, 6, 7, 8], max_tokens, SamplingParams(temperature=1.0, seed=100 + i), eos,
                          constraint=constraint)
        for i in range(4)
    ]
    for tokens, finish in run(engine, requests).values():
        assert len(tokens) <= max_tokens
        jsonschema.validate(answer_json(tokenizer.decode(tokens)), schema)
        assert finish == "stop"


def test_model_vocabulary_wider_than_its_tokenizer(tmp_path):
    """Real checkpoints pad their embeddings past the tokenizer (the demo model does too):
    masks span the model's logits, and tokens past the tokenizer are never allowed."""
    from mlx_lm import load

    from omlx.testing.tiny_models import TinyModelSpec, build_model

    model, tokenizer = load(str(build_model(tmp_path / "wide", TinyModelSpec(vocab_size=2048, seed=9))))
    assert len(tokenizer) < 2048
    engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=200, max_num_batched_tokens=64), 4096)
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format=json_format(SMALL))
    requests = [
        GenerationRequest(f"w{i}", [5 + i, 6, 7], 40, SamplingParams(temperature=1.0, seed=i), eos, constraint=constraint)
        for i in range(3)
    ]
    for tokens, finish in run(engine, requests).values():
        assert finish == "stop" and max(tokens) < len(tokenizer)
        jsonschema.validate(answer_json(tokenizer.decode(tokens)), SMALL)


def test_json_object_mode(tiny):
    _, tokenizer, engine = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format={"type": "json_object"})
    requests = [
        GenerationRequest(f"o{i}", [9, 8, 7, i + 20], 120, SamplingParams(temperature=1.0, seed=i), eos, constraint=constraint)
        for i in range(4)
    ]
    for tokens, _ in run(engine, requests).values():
        assert isinstance(answer_json(tokenizer.decode(tokens)), dict)


# ---------------------------------------------------------------------------- hypothesis

_names = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
_leaf = st.one_of(
    st.just({"type": "string"}),
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "integer"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
)


def _array(items):
    return st.tuples(items, st.integers(0, 2), st.booleans()).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], **({"maxItems": t[1] + 3} if t[2] else {})}
    )


def _object(values):
    properties = st.dictionaries(_names, values, min_size=1, max_size=4)
    return properties.flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required}
        )
    )


# Depth <= 2: an object whose properties are leaves, arrays of leaves or objects of leaves.
schemas = _object(st.one_of(_leaf, _array(_leaf), _object(_leaf)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**31 - 1), room=st.integers(0, 120))
@pytest.mark.slow
def test_random_schemas_always_validate(tiny, schema, seed, room):
    _, tokenizer, engine = tiny
    jsonschema.Draft202012Validator.check_schema(schema)
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format=json_format(schema))
    # Any budget that leaves room for the shortest document (the documented guarantee).
    max_tokens = constraint.skeleton + CLOSING_MARGIN + room
    requests = [
        GenerationRequest(f"h{i}", [7 + i, 300, 12, 45], max_tokens, SamplingParams(temperature=1.0, seed=seed + i), eos,
                          constraint=constraint)
        for i in range(3)
    ]
    for tokens, finish in run(engine, requests).values():
        jsonschema.validate(answer_json(tokenizer.decode(tokens)), schema)
        assert finish == "stop"


# A property whose value is an object with required keys: choosing its key lengthens the way
# out by ~20 tokens at once, far more than the closing margin.  Hypothesis found this example
# (seed 1 picked "b" at the first key and ran out of tokens mid-document).
OPTIONAL_OBJECT = {
    "type": "object",
    "properties": {
        "b": {"type": "object", "properties": {"a": {"type": "string"}, "a_": {"type": "string"}}, "required": ["a", "a_"]},
        "a": {"type": "string"},
    },
    "required": ["a"],
}


def test_a_key_that_commits_to_required_structure_is_held_back_near_the_end(tiny):
    """Regression: with 34 tokens (skeleton 9 + margin 12 + 13) a fresh engine sampled `{"b": {...`,
    whose shortest ending no longer fit, and the request ended on its length mid-document."""
    model, tokenizer, _ = tiny
    engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=600, max_num_batched_tokens=256), 4096)
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, response_format=json_format(OPTIONAL_OBJECT))
    max_tokens = constraint.skeleton + CLOSING_MARGIN + 13
    assert max_tokens == 34
    requests = [
        GenerationRequest(f"r{i}", [7 + i, 300, 12, 45], max_tokens, SamplingParams(temperature=1.0, seed=i), eos,
                          constraint=constraint)
        for i in range(3)
    ]
    for tokens, finish in run(engine, requests).values():
        assert len(tokens) <= max_tokens
        jsonschema.validate(answer_json(tokenizer.decode(tokens)), OPTIONAL_OBJECT)
        assert finish == "stop"

    # The same, without the model: the state allows the key "b" only while its object fits.
    b = tokenizer.encode('"b', add_special_tokens=False)[-1]
    vocab = model.args.vocab_size
    for budget, allowed in ((34, False), (60, True)):
        state = constraint.new_state(budget)
        for token in tokenizer.encode('{"', add_special_tokens=False):
            assert allowed_tokens([state], vocab)[0, token]
            state.accept(token)
        assert allowed_tokens([state], vocab)[0, b] == allowed


# ---------------------------------------------------------------------------- API


MESSAGES = [{"role": "user", "content": "describe a person as JSON"}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_json_schema(client, stream):
    for seed in range(3):
        kwargs = dict(model="tiny", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=150,
                      response_format=json_format(PERSON))
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        else:
            r = client.chat.completions.create(**kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        jsonschema.validate(json.loads(content), PERSON)
        assert finish == "stop"


def test_chat_json_object(client):
    r = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=100,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_response_format_text_is_plain(client, server):
    path = server.model_path("tiny-llama")
    prompt_ids = chat_prompt_ids(path, MESSAGES)
    tokens, _ = reference_greedy(path, prompt_ids, 12)
    r = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, temperature=0, max_tokens=12, response_format={"type": "text"}
    )
    assert r.choices[0].message.content == decode(path, tokens)


async def test_constrained_requests_do_not_change_free_ones(async_client, server):
    path = server.model_path("tiny")
    free_messages = [[{"role": "user", "content": f"tell me about the {w}"}] for w in ("river", "city", "night")]
    expected = [decode(path, reference_greedy(path, chat_prompt_ids(path, m), 30)[0]) for m in free_messages]
    free = [async_client.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=30)
            for m in free_messages]
    constrained = [
        async_client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, seed=s, max_tokens=120,
                                             response_format=json_format(PERSON))
        for s in range(4)
    ]
    results = await asyncio.gather(*free, *constrained)
    assert [r.choices[0].message.content for r in results[:3]] == expected
    for r in results[3:]:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        "json",
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
        {"type": "json_schema", "json_schema": {"name": 5, "schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {  # unsatisfiable
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 2}}, "required": ["a"]}}},
    ],
)
def test_bad_response_format_is_400(client, response_format):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, extra_body={"response_format": response_format})
    assert info.value.status_code == 400
    assert info.value.body["param"] == "response_format"
    # The server is fine afterwards.
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


class _BrokenConstraint:
    """A constraint whose grammar engine fails mid-request."""

    num_words = 0
    active = True
    finished = False

    def fill_bitmask(self, row):
        raise RuntimeError("grammar engine failure")

    @classmethod
    def fill_bitmasks(cls, states, bitmask, rows):
        for state, row in zip(states, rows):
            state.fill_bitmask(bitmask[row])

    def accept(self, token):
        raise RuntimeError("grammar engine failure")


class _BrokenFactory:
    def new_state(self, max_tokens):
        return _BrokenConstraint()


def test_a_failing_constraint_ends_only_its_own_request(tiny):
    model, tokenizer, engine = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    prompt = [21, 22, 23, 24]
    requests = [
        GenerationRequest("broken", prompt, 20, stop_token_ids=eos, constraint=_BrokenFactory()),
        GenerationRequest("free", prompt[:3], 20, stop_token_ids=eos),
    ]
    results = run(engine, requests)
    assert results["broken"][0] == []  # ended at once, without output
    assert results["free"][0] == greedy_reference(model, prompt[:3], 20, eos)
