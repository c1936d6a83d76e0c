"""logprobs / top_logprobs: the engine reports the sampled token's log-probability under the
model (checked against mlx-lm's own logits for the same prefix) and the most likely
alternatives, only for the requests that ask; the OpenAI routes carry them in both shapes,
streamed and not."""

from __future__ import annotations

import math

import mlx.core as mx
import openai
import pytest
from conftest import chat_prompt_ids, decode, load_reference, reference_greedy, tokenizer_of

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference

PROMPT = [11, 42, 97, 5, 230, 18, 64, 301, 77]


def reference_logprobs(model, tokens: list[int]) -> list[float]:
    """log_softmax of mlx-lm's logits after `tokens` (the model run alone, no cache)."""
    logits = model(mx.array([tokens]))[0, -1].astype(mx.float32)
    return (logits - mx.logsumexp(logits)).tolist()


def run_engine(model, requests: list[GenerationRequest]) -> dict[str, list]:
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64), 4096)
    for r in requests:
        engine.add_request(r)
    events: dict[str, list] = {r.request_id: [] for r in requests}
    while engine.has_work:
        for request_id, event in engine.step():
            if event.token_id is not None:
                events[request_id].append(event)
    assert engine.blocks.leaked_blocks() == []
    return events


@pytest.fixture(scope="module")
def tiny_model(model_dir):
    return load_reference(model_dir / "tiny")


def check_against_reference(model, prompt: list[int], events, k: int) -> None:
    out: list[int] = []
    for event in events:
        ref = reference_logprobs(model, prompt + out)
        assert event.logprob == pytest.approx(ref[event.token_id], abs=1e-4)
        top = event.top_logprobs
        assert len(top) == k
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        for token_id, logprob in top:
            assert logprob == pytest.approx(ref[token_id], abs=1e-4)
        # The k reported alternatives are the k most likely tokens of the reference.
        kth = sorted(ref, reverse=True)[k - 1]
        assert min(values) >= kth - 1e-4
        out.append(event.token_id)


def test_greedy_logprobs_match_mlx_lm(tiny_model):
    model, tokenizer = tiny_model
    eos = frozenset(tokenizer.eos_token_ids)
    request = GenerationRequest("lp", PROMPT, 12, stop_token_ids=eos, logprobs=5)
    events = run_engine(model, [request])["lp"]
    expected = greedy_reference(model, PROMPT, 12, eos)
    assert [e.token_id for e in events] == expected
    check_against_reference(model, PROMPT, events, 5)
    for e in events:  # greedy: the sampled token is the most likely alternative
        assert e.top_logprobs[0][0] == e.token_id
        assert e.logprob == e.top_logprobs[0][1]


def test_sampled_logprobs_are_before_temperature(tiny_model):
    """With temperature and top-p the reported log-probabilities are still the model's."""
    model, tokenizer = tiny_model
    eos = frozenset(tokenizer.eos_token_ids)
    hot = SamplingParams(temperature=1.7, top_p=0.9, seed=5)
    request = GenerationRequest("hot", PROMPT, 10, hot, eos, logprobs=3)
    events = run_engine(model, [request])["hot"]
    assert len(events) > 0
    check_against_reference(model, PROMPT, events, 3)


def test_logprobs_only_for_rows_that_ask(tiny_model):
    model, tokenizer = tiny_model
    eos = frozenset(tokenizer.eos_token_ids)
    requests = [
        GenerationRequest("plain", PROMPT, 8, stop_token_ids=eos),
        GenerationRequest("top0", PROMPT[:5], 8, stop_token_ids=eos, logprobs=0),
        GenerationRequest("top2", PROMPT[2:], 8, SamplingParams(temperature=1.0, seed=1), eos, logprobs=2),
    ]
    events = run_engine(model, requests)
    assert all(e.logprob is None and e.top_logprobs is None for e in events["plain"])
    assert all(e.logprob is not None and e.top_logprobs == [] for e in events["top0"])
    check_against_reference(model, PROMPT[2:], events["top2"], 2)
    # Batched with others, the greedy rows' tokens are unchanged.
    alone = run_engine(model, [GenerationRequest("plain", PROMPT, 8, stop_token_ids=eos)])["plain"]
    assert [e.token_id for e in events["plain"]] == [e.token_id for e in alone]


# ---------------------------------------------------------------------------- API


MESSAGES = [{"role": "user", "content": "tell me about the river and the city"}]


def test_chat_logprobs(client, server):
    path = server.model_path("tiny")
    model, _ = load_reference(path)
    prompt_ids = chat_prompt_ids(path, MESSAGES)
    tokens, _ = reference_greedy(path, prompt_ids, 12)
    # Both calls below must start from the same prefix-cache state: a prompt tail recomputed
    # after a cache hit goes through matmuls of another row count than the full prompt did,
    # and on some CPUs' BLAS kernels that moves logprobs in the 7th digit.  Warm the cache
    # first, so the streamed and unstreamed answers are computed the same way.
    client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=1)
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True, top_logprobs=4
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert choice.message.content == decode(path, tokens)
    assert len(content) == len(tokens)
    # The tokens' exact bytes make up the text (a random model may write invalid UTF-8,
    # which decoding replaces the same way).
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == choice.message.content
    for i, (entry, token) in enumerate(zip(content, tokens)):
        ref = reference_logprobs(model, prompt_ids + tokens[:i])
        assert entry.logprob == pytest.approx(ref[token], abs=1e-4)
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True, top_logprobs=4, stream=True
        )
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_chat_without_logprobs_has_none(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[]] * 4


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completion_logprobs(client, server, stream):
    path = server.model_path("tiny-llama")
    model, _ = load_reference(path)
    prompt = "the model server reads the prompt"
    prompt_ids = list(tokenizer_of(path).encode(prompt))
    tokens, _ = reference_greedy(path, prompt_ids, 10)
    kwargs = dict(model="tiny-llama", prompt=prompt, temperature=0, max_tokens=10, logprobs=3)
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        text = "".join(c.choices[0].text for c in chunks)
        token_logprobs = [v for p in parts for v in p.token_logprobs]
        top = [d for p in parts for d in p.top_logprobs]
        offsets = [o for p in parts for o in p.text_offset]
        token_texts = [t for p in parts for t in p.tokens]
    else:
        r = client.completions.create(**kwargs)
        lp = r.choices[0].logprobs
        text, token_logprobs, top, offsets, token_texts = (
            r.choices[0].text, lp.token_logprobs, lp.top_logprobs, lp.text_offset, lp.tokens,
        )
    assert text == decode(path, tokens)
    assert len(token_logprobs) == len(tokens)
    for i, token in enumerate(tokens):
        ref = reference_logprobs(model, prompt_ids + tokens[:i])
        assert token_logprobs[i] == pytest.approx(ref[token], abs=1e-4)
        assert 1 <= len(top[i]) <= 3
        assert max(top[i].values()) == pytest.approx(token_logprobs[i], abs=1e-6)
    assert offsets == [sum(len(t) for t in token_texts[:i]) for i in range(len(token_texts))]


@pytest.mark.parametrize(
    "kind, body, param",
    [
        ("chat", {"top_logprobs": 3}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": "yes"}, "logprobs"),
        ("completion", {"logprobs": 21}, "logprobs"),
        ("completion", {"logprobs": 2, "echo": True}, "logprobs"),
    ],
)
def test_bad_logprobs_requests(client, kind, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        if kind == "chat":
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body=body)
        else:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2, extra_body=body)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
