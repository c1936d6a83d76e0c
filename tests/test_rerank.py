"""`/v1/rerank`, `/rerank` and `/v2/rerank` over tiny random cross-encoders of each family
(BERT, XLM-RoBERTa, ModernBERT) and a Qwen3-Reranker-style LLM reranker, served by a real
`omlx serve`.

Scores are checked against forwards computed here from the same weight files: a plain numpy
BERT / XLM-RoBERTa encoder with the classification head, ModernBERT's encoder run alone with
the head in numpy, and for the LLM reranker the yes/no logits of mlx-lm run alone on the
prompt its model card documents.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from omlx.embeddings.batcher import PassBatcher
from omlx.models.discovery import detect_model_type, inspect_model_folder
from omlx.testing.tiny_rerankers import TinyCrossEncoderSpec, build_cross_encoder_folder, build_llm_reranker

from omlx_process import omlx_server

CROSS_ENCODERS = {
    "tiny-bert-reranker": TinyCrossEncoderSpec(family="bert", num_labels=1),
    "tiny-xlmr-reranker": TinyCrossEncoderSpec(family="xlm-roberta", num_labels=1, seed=1),
    "tiny-modernbert-reranker": TinyCrossEncoderSpec(family="modernbert", num_labels=2, seed=2,
                                                     classifier_pooling="mean"),
}
LLM_RERANKER = "tiny-Qwen3-Reranker"
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"  # served from its package

QUERY = "what is the cat"
DOCUMENTS = [
    "the cat is a dog",
    "river mountain city house",
    "a cat and a bird in the tree",
    "python code function return value error",
    "the cat",
    "music light dark time day night",
]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerankers")
    for name, spec in CROSS_ENCODERS.items():
        build_cross_encoder_folder(root / name, spec)
    build_llm_reranker(root / LLM_RERANKER)
    return root


@pytest.fixture(scope="module")
def server(reranker_dir, tmp_path_factory):
    with omlx_server(reranker_dir, tmp_path_factory.mktemp("rerank-server"), "--kv-cache-gb", "0.05",
                     failure=pytest.fail) as running:
        yield running


def post(server, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.root + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---------------------------------------------------------------------------- references


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _weights(path) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(path / "model.safetensors")).items()}


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps) * weight
    return out + bias if bias is not None else out


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def bert_style_encoder(w: dict, prefix: str, config: dict, ids: list[int], types: list[int]) -> np.ndarray:
    """Hidden states of one unpadded sequence through a BERT / RoBERTa encoder, in numpy."""
    def p(name):
        return w[f"{prefix}.{name}"]

    eps = config["layer_norm_eps"]
    n = len(ids)
    if config["model_type"] == "xlm-roberta":
        positions = np.arange(n) + config["pad_token_id"] + 1
    else:
        positions = np.arange(n)
    x = (p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[positions]
         + p("embeddings.token_type_embeddings.weight")[types])
    x = _layer_norm(x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), eps)
    heads = config["num_attention_heads"]
    d = config["hidden_size"] // heads
    for layer in range(config["num_hidden_layers"]):
        def lin(name, v):
            base = f"encoder.layer.{layer}.{name}"
            return v @ p(base + ".weight").T + p(base + ".bias")

        q, k, v = (lin(f"attention.self.{n_}", x).reshape(n, heads, d).transpose(1, 0, 2) for n_ in ("query", "key", "value"))
        context = (_softmax(q @ k.transpose(0, 2, 1) / math.sqrt(d)) @ v).transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(lin("attention.output.dense", context) + x,
                        p(f"encoder.layer.{layer}.attention.output.LayerNorm.weight"),
                        p(f"encoder.layer.{layer}.attention.output.LayerNorm.bias"), eps)
        h = lin("output.dense", _gelu(lin("intermediate.dense", x)))
        x = _layer_norm(h + x, p(f"encoder.layer.{layer}.output.LayerNorm.weight"),
                        p(f"encoder.layer.{layer}.output.LayerNorm.bias"), eps)
    return x


def _modernbert_states(path, config, ids: list[int]) -> np.ndarray:
    from mlx_embeddings.models import modernbert

    encoder = modernbert.ModernBertModel(modernbert.ModelArgs.from_dict(config))
    for layer in encoder.layers:  # HF's "gelu" is the erf form; mlx-embeddings hard-codes tanh's
        layer.mlp.act = nn.GELU()
    weights = mx.load(str(path / "model.safetensors"))
    encoder.load_weights([(k[len("model."):], v) for k, v in weights.items() if k.startswith("model.")])
    states = encoder(mx.array([ids]), attention_mask=mx.ones((1, len(ids))), return_dict=True)["last_hidden_state"]
    return np.array(states[0], dtype=np.float64)


def reference_scores(path, query: str, documents: list[str]) -> list[float]:
    """The relevance of each (query, document) pair, one pair at a time, without padding."""
    config = json.loads((path / "config.json").read_text())
    tokenizer = _tokenizer(path)
    w = _weights(path)
    scores = []
    for document in documents:
        encoded = tokenizer(query, document, truncation="only_second", max_length=tokenizer.model_max_length)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") or [0] * len(ids)
        if config["model_type"] == "bert":
            states = bert_style_encoder(w, "bert", config, ids, types)
            pooled = np.tanh(states[0] @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
            logits = pooled @ w["classifier.weight"].T + w["classifier.bias"]
        elif config["model_type"] == "xlm-roberta":
            states = bert_style_encoder(w, "roberta", config, ids, types)
            hidden = np.tanh(states[0] @ w["classifier.dense.weight"].T + w["classifier.dense.bias"])
            logits = hidden @ w["classifier.out_proj.weight"].T + w["classifier.out_proj.bias"]
        else:
            states = _modernbert_states(path, config, ids)
            pooled = states.mean(0) if config["classifier_pooling"] == "mean" else states[0]
            hidden = _layer_norm(_gelu(pooled @ w["head.dense.weight"].T), w["head.norm.weight"], None,
                                 config["norm_eps"])
            logits = hidden @ w["classifier.weight"].T + w["classifier.bias"]
        if logits.shape[-1] == 1:
            scores.append(float(1 / (1 + np.exp(-logits[0]))))
        else:
            scores.append(float(_softmax(logits)[-1]))
    return scores


def pair_tokens(path, query: str, documents: list[str]) -> int:
    tokenizer = _tokenizer(path)
    return sum(len(tokenizer(query, d, truncation="only_second", max_length=tokenizer.model_max_length)["input_ids"])
               for d in documents)


# ---------------------------------------------------------------------------- cross-encoders


@pytest.mark.parametrize("model", list(CROSS_ENCODERS))
def test_scores_equal_a_reference_forward(server, reranker_dir, model):
    status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": DOCUMENTS})
    assert status == 200, body
    expected = reference_scores(reranker_dir / model, QUERY, DOCUMENTS)
    assert body["model"] == model and body["id"]
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCUMENTS)))
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}  # oMLX returns them by default
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert len(set(round(s, 4) for s in expected)) > 1  # the order is a real check
    assert body["usage"]["total_tokens"] == pair_tokens(reranker_dir / model, QUERY, DOCUMENTS)


def test_top_n_objects_and_the_plain_route(server, reranker_dir):
    model = "tiny-bert-reranker"
    expected = reference_scores(reranker_dir / model, QUERY, DOCUMENTS)
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    status, body = post(server, "/rerank", {
        "model": model, "query": {"text": QUERY}, "documents": [{"text": d} for d in DOCUMENTS],
        "top_n": 2, "return_documents": False})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == best[:2]
    assert all("document" not in r for r in body["results"])
    # top_n beyond the documents returns them all
    status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": DOCUMENTS[:3], "top_n": 50})
    assert status == 200 and len(body["results"]) == 3


def test_cohere_v2_shape(server, reranker_dir):
    model = "tiny-xlmr-reranker"
    expected = reference_scores(reranker_dir / model, QUERY, DOCUMENTS)
    status, body = post(server, "/v2/rerank", {"model": model, "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    assert status == 200, body
    assert body["meta"]["api_version"]["version"] == "2"
    assert body["meta"]["billed_units"]["search_units"] == 1
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    for result in body["results"]:
        assert set(result) == {"index", "relevance_score"}  # Cohere v2 returns no documents
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)


def test_long_documents_score_by_their_best_chunk(server, reranker_dir):
    model = "tiny-bert-reranker"
    path = reranker_dir / model
    tokenizer = _tokenizer(path)
    room = tokenizer.model_max_length - len(tokenizer(QUERY, "")["input_ids"])
    # Words that are one token each, so the pieces the server cuts are known here.
    words = [w for w in ("cat dog bird tree river mountain city house car road book paper music light dark "
                         "time day night red green blue one two three four five six seven eight nine ten").split()
             if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    document_words = (words * 20)[: room * 3 - 5]
    pieces = [" ".join(document_words[i: i + room]) for i in range(0, len(document_words), room)]
    assert len(pieces) == 3
    per_piece = reference_scores(path, QUERY, pieces)
    document = " ".join(document_words)
    status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": [document, DOCUMENTS[0]],
                                               "max_chunks_per_doc": 3})
    assert status == 200, body
    scored = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert scored[0] == pytest.approx(max(per_piece), abs=1e-4)
    assert body["usage"]["total_tokens"] == pair_tokens(path, QUERY, pieces + [DOCUMENTS[0]])
    # Two pieces at most: the best of the first two.
    status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": [document],
                                               "max_chunks_per_doc": 2})
    assert body["results"][0]["relevance_score"] == pytest.approx(max(per_piece[:2]), abs=1e-4)
    # By default (oMLX): truncated to what fits, the first piece.
    status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": [document]})
    assert body["results"][0]["relevance_score"] == pytest.approx(per_piece[0], abs=1e-4)
    # v2's max_tokens_per_doc drops the tokens past it.
    status, body = post(server, "/v2/rerank", {"model": model, "query": QUERY, "documents": [document],
                                               "max_tokens_per_doc": 7})
    assert body["results"][0]["relevance_score"] == pytest.approx(
        reference_scores(path, QUERY, [" ".join(document_words[:7])])[0], abs=1e-4)


async def test_concurrent_calls_get_their_own_scores(server, reranker_dir):
    import aiohttp

    model = "tiny-modernbert-reranker"
    queries = ["what is the cat", "river city", "python error", "music at night"]
    expected = {q: reference_scores(reranker_dir / model, q, DOCUMENTS) for q in queries}
    async with aiohttp.ClientSession() as session:
        async def one(query):
            async with session.post(server.root + "/v1/rerank",
                                    json={"model": model, "query": query, "documents": DOCUMENTS}) as response:
                assert response.status == 200
                return query, await response.json()

        replies = await asyncio.gather(*[one(q) for q in queries * 3])
    for query, body in replies:
        for result in body["results"]:
            assert result["relevance_score"] == pytest.approx(expected[query][result["index"]], abs=1e-4)


def test_health_and_model_list_show_rerankers(server):
    post(server, "/v1/rerank", {"model": "tiny-bert-reranker", "query": QUERY, "documents": DOCUMENTS})
    health = server.health()
    assert health["reranker_models_loaded"]["tiny-bert-reranker"]["inputs"] >= len(DOCUMENTS)
    with urllib.request.urlopen(server.root + "/v1/models/status", timeout=30) as response:
        status = {m["id"]: m for m in json.loads(response.read())["models"]}
    for name in [*CROSS_ENCODERS, LLM_RERANKER]:
        assert status[name]["model_type"] == "reranker"
    with urllib.request.urlopen(server.base_url + "/models", timeout=30) as response:
        listed = {m["id"] for m in json.loads(response.read())["data"]}
    with urllib.request.urlopen(server.root + "/api/v1/models", timeout=30) as response:
        lmstudio = {m["key"]: m for m in json.loads(response.read())["models"]}
    for name in [*CROSS_ENCODERS, LLM_RERANKER]:
        assert name in listed and lmstudio[name]["type"] == "reranker"
    assert lmstudio["tiny-bert-reranker"]["loaded_instances"]


@pytest.mark.parametrize(("body", "param", "status"), [
    ({"documents": DOCUMENTS}, "query", 400),
    ({"query": "", "documents": DOCUMENTS}, "query", 400),
    ({"query": 5, "documents": DOCUMENTS}, "query", 400),
    ({"query": QUERY}, "documents", 400),
    ({"query": QUERY, "documents": []}, "documents", 400),
    ({"query": QUERY, "documents": ["x"] * 4097}, "documents", 400),
    ({"query": QUERY, "documents": ["ok", 3]}, "documents", 400),
    ({"query": QUERY, "documents": [{"title": "no text"}]}, "documents", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "top_n": "3"}, "top_n", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "return_documents": "yes"}, "return_documents", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "max_chunks_per_doc": 0}, "max_chunks_per_doc", 400),
    ({"query": "cat " * 200, "documents": DOCUMENTS}, "query", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "model": EMBEDDER}, "model", 400),
    ({"query": QUERY, "documents": DOCUMENTS, "model": "no-such-model"}, "model", 404),
])
def test_bad_input_is_an_openai_shaped_4xx(server, body, param, status):
    got, reply = post(server, "/v1/rerank", {"model": "tiny-bert-reranker", **body})
    assert got == status, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]


def test_malformed_bodies(server):
    for raw in (b"{not json", b"[1, 2]", b""):
        status, reply = post(server, "/v1/rerank", raw)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    # Several rerankers here: the model must be named.
    status, reply = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert status == 400 and reply["error"]["param"] == "model"


# ---------------------------------------------------------------------------- the LLM reranker


def qwen3_reranker_prompt(tokenizer, query: str, document: str,
                          instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
                          ) -> list[int]:
    """The model card's recipe, written out independently of omlx.rerank.llm."""
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
              "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    pair = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    return (tokenizer.encode(prefix, add_special_tokens=False) + tokenizer.encode(pair, add_special_tokens=False)
            + tokenizer.encode(suffix, add_special_tokens=False))


def _mlx_lm_scores(reranker_dir, documents, **prompt_options) -> list[float]:
    from mlx_lm import load

    model, tokenizer = load(str(reranker_dir / LLM_RERANKER))
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    expected = []
    for document in documents:
        logits = model(mx.array([qwen3_reranker_prompt(tokenizer, QUERY, document, **prompt_options)]))[0, -1]
        pair = np.array(logits[mx.array([no, yes])].astype(mx.float32), dtype=np.float64)
        expected.append(float(_softmax(pair)[1]))
    return expected


def test_llm_reranker_scores_equal_mlx_lm_yes_no_softmax(server, reranker_dir):
    from mlx_lm import load

    _, tokenizer = load(str(reranker_dir / LLM_RERANKER))
    expected = _mlx_lm_scores(reranker_dir, DOCUMENTS)
    status, body = post(server, "/v1/rerank", {"model": LLM_RERANKER, "query": QUERY, "documents": DOCUMENTS})
    assert status == 200, body
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert body["usage"]["total_tokens"] == sum(len(qwen3_reranker_prompt(tokenizer, QUERY, d)) for d in DOCUMENTS)
    # Its prompts went through the LLM engine, where they share the cached head of the prompt.
    stats = server.health()["models_loaded"][LLM_RERANKER]
    assert stats["prefill_tokens"] < body["usage"]["total_tokens"]


def test_llm_reranker_takes_an_instruction(server, reranker_dir):
    instruction = "Find the passage about animals"
    expected = _mlx_lm_scores(reranker_dir, DOCUMENTS[:3], instruction=instruction)
    status, body = post(server, "/v2/rerank", {"model": LLM_RERANKER, "query": QUERY, "documents": DOCUMENTS[:3],
                                               "instruction": instruction})
    assert status == 200, body
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
    assert expected != _mlx_lm_scores(reranker_dir, DOCUMENTS[:3])  # the instruction is in the prompt


def test_llm_reranker_is_not_a_chat_model(server):
    status, reply = post(server, "/v1/chat/completions", {"model": LLM_RERANKER,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and reply["error"]["param"] == "model"


# ---------------------------------------------------------------------------- in-process


def test_discovery_marks_llm_rerankers(reranker_dir):
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    assert detect_model_type(qwen3, model_id="Qwen/Qwen3-Reranker-0.6B") == "reranker"
    assert detect_model_type({**qwen3, "is_original_qwen3_reranker": True}, model_id="my-model") == "reranker"
    assert detect_model_type(qwen3, model_id="Qwen/Qwen3-0.6B") == "llm"
    assert inspect_model_folder("x", reranker_dir / LLM_RERANKER).model_type == "reranker"
    assert inspect_model_folder("x", reranker_dir / "tiny-bert-reranker").model_type == "reranker"


@pytest.fixture(scope="module")
def cross_encoder(reranker_dir):
    from omlx.rerank.cross_encoder import load_cross_encoder

    return load_cross_encoder(inspect_model_folder("bert", reranker_dir / "tiny-bert-reranker"))


async def test_concurrent_calls_share_forward_passes(cross_encoder):
    batcher = PassBatcher(cross_encoder.score_rows, length=lambda row: len(row[0]))
    try:
        queries = [f"{w} question" for w in ("cat", "tree", "road", "music", "city", "book")]
        requests = [cross_encoder.encode_pairs(q, DOCUMENTS)[0] for q in queries]
        alone = [cross_encoder.score_rows(rows) for rows in requests]
        before = cross_encoder.stats.batches
        results = await asyncio.gather(*[batcher.run(rows) for rows in requests])
        assert cross_encoder.stats.batches - before == 1  # six calls, one forward pass
        for got, want in zip(results, alone):
            np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        batcher.close()


async def test_a_large_call_is_split_under_the_token_budget(cross_encoder):
    budget = 256
    batcher = PassBatcher(cross_encoder.score_rows, length=lambda row: len(row[0]), max_batch_tokens=budget)
    try:
        documents = [" ".join(["cat", "dog", "tree"] * (1 + i % 7)) for i in range(32)]
        rows, _ = cross_encoder.encode_pairs(QUERY, documents)
        before = cross_encoder.stats.batches
        scores = await batcher.run(rows)
        passes = cross_encoder.stats.batches - before
        assert passes >= sum(len(r[0]) for r in rows) / budget and passes < len(rows)
        np.testing.assert_allclose(scores, [cross_encoder.score_rows([r])[0] for r in rows], atol=1e-5)
    finally:
        batcher.close()


def metric_samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.root + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_rerank_calls_are_counted_in_the_metrics(server):
    model = "tiny-xlmr-reranker"
    labels = (("model_name", model),)
    before = metric_samples(server)
    usage = 0
    for documents in (DOCUMENTS, DOCUMENTS[:2]):
        status, body = post(server, "/v1/rerank", {"model": model, "query": QUERY, "documents": documents})
        assert status == 200, body
        usage += body["usage"]["total_tokens"]
    after = metric_samples(server)

    def moved(name):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("omlx:rerank_requests_total") == 2
    assert moved("omlx:rerank_documents_total") == len(DOCUMENTS) + 2
    assert moved("omlx:rerank_tokens_total") == usage
