"""`POST /v1/rerank` (and `/rerank`: oMLX, Jina and Cohere v1 shape) and `POST /v2/rerank`
(Cohere v2 shape) over the reranker models in the pool.

Request: `model`, `query` (a string, or `{"text": ...}`), `documents` (strings or
`{"text": ...}` objects), `top_n`, `return_documents` (default true, as oMLX), and
`max_chunks_per_doc` (v1: a long document is scored in up to that many pieces, its best
piece counting; by default it is truncated, as oMLX does) or `max_tokens_per_doc` (v2: the
document's tokens beyond that are dropped).  LLM rerankers also take `instruction`.

Response: `{"id", "model", "results": [{"index", "relevance_score", "document": {"text"}}],
"usage": {"total_tokens"}}`, results sorted by score, best first; v2 adds Cohere's `meta`
and leaves out the documents unless `return_documents` is true.
"""

from __future__ import annotations

import uuid

import numpy as np
import orjson
from aiohttp import web

from omlx.embeddings.batcher import PassBatcher
from omlx.models.loaded import LoadedModel
from omlx.models.pool import ModelPool
from omlx.rerank.cross_encoder import LoadedCrossEncoder, QueryTooLong
from omlx.rerank.llm import LLMReranker, RerankFailed
from omlx.serving_limits import limits_of

from .admission import admit
from .errors import invalid
from .generation import EngineFailure
from .model_access import lease_for_request
from .offload import offload
from .wire import read_json

MAX_DOCUMENTS = 4096
MAX_CHUNKS_PER_DOC = 64


def _positive_int(body: dict, name: str, limit: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(f"'{name}' must be a positive integer", name, "invalid_value")
    if limit is not None and value > limit:
        raise invalid(f"'{name}' is {value}; at most {limit}", name, "invalid_value")
    return value


def _text(value) -> str | None:
    """A string, or the `text` of a `{"text": ...}` object; None if neither."""
    if isinstance(value, dict):
        value = value.get("text")
    return value if isinstance(value, str) else None


def parse_query(body: dict) -> str:
    query = _text(body.get("query"))
    if query is None:
        raise invalid("'query' must be a string (or an object with a 'text' string)", "query",
                      "invalid_type" if "query" in body else "missing_required_parameter")
    if not query.strip():
        raise invalid("'query' is empty", "query", "invalid_value")
    return query


def parse_documents(body: dict) -> list[str]:
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise invalid("'documents' must be a non-empty list of strings or {\"text\": ...} objects",
                      "documents", "invalid_value")
    if len(documents) > MAX_DOCUMENTS:
        raise invalid(f"'documents' has {len(documents)} items; at most {MAX_DOCUMENTS} per request",
                      "documents", "invalid_value")
    texts = []
    for i, document in enumerate(documents):
        text = _text(document)
        if text is None:
            raise invalid(f"'documents[{i}]' must be a string or an object with a 'text' string",
                          "documents", "invalid_type")
        texts.append(text)
    return texts


def batcher_of(reranker: LoadedCrossEncoder) -> PassBatcher:
    if reranker.batcher is None:
        reranker.batcher = PassBatcher(reranker.score_rows, length=lambda row: len(row[0]),
                                       thread_name="omlx-rerank")
    return reranker.batcher


def best_per_document(scores: np.ndarray, owners: list[int], count: int) -> np.ndarray:
    """Each document's score: the best of its pieces'."""
    best = np.full(count, -np.inf, dtype=np.float32)
    np.maximum.at(best, np.asarray(owners, dtype=np.int64), scores)
    return best


class RerankRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/rerank", self.rerank_v1)
        app.router.add_post("/rerank", self.rerank_v1)
        app.router.add_post("/v2/rerank", self.rerank_v2)

    async def rerank_v1(self, request: web.Request) -> web.Response:
        return await self._rerank(request, version=1)

    async def rerank_v2(self, request: web.Request) -> web.Response:
        return await self._rerank(request, version=2)

    def default_model(self) -> str:
        rerankers = self.pool.servable("reranker")
        if len(rerankers) == 1:
            return rerankers[0].model_id
        raise invalid("'model' is required (this server has "
                      f"{len(rerankers) or 'no'} reranker models)", "model", "missing_required_parameter")

    async def _rerank(self, request: web.Request, version: int) -> web.Response:
        body = await read_json(request)  # the shared read timeout, JSON and nesting checks
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        model = body.get("model") or self.default_model()
        if not isinstance(model, str):
            raise invalid("'model' must be a string", "model", "invalid_type")
        query = parse_query(body)
        documents = parse_documents(body)
        top_n = _positive_int(body, "top_n")
        if "top_k" in body and top_n is None:  # llama.cpp's and some clients' name for it
            top_n = _positive_int(body, "top_k")
        return_documents = body.get("return_documents")
        if return_documents is None:  # oMLX returns them by default; Cohere v2 never did
            return_documents = version == 1
        if not isinstance(return_documents, bool):
            raise invalid("'return_documents' must be a boolean", "return_documents", "invalid_type")
        max_chunks = _positive_int(body, "max_chunks_per_doc", MAX_CHUNKS_PER_DOC) or 1
        max_doc_tokens = _positive_int(body, "max_tokens_per_doc")
        instruction = body.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise invalid("'instruction' must be a string", "instruction", "invalid_type")

        reranker = await lease_for_request(request, self.pool, model, "reranker")
        try:
            if reranker.generates:  # a causal LM scored on its yes / no logits
                scorer = self._llm_reranker(reranker)
                # Tokenizing the documents scales with the body: off the event loop.
                rows, owners = await offload(scorer.prompts, query, documents, instruction, max_chunks,
                                             max_doc_tokens, size=request.content_length)
                # The call takes one place in the model's bounded queue, as a chat request does.
                admit(request, self.pool, reranker, f"rerank-call-{uuid.uuid4().hex}")
                scores = await scorer.score(rows)
                tokens = sum(len(r) for r in rows)
            else:
                rows, owners = await offload(reranker.encode_pairs, query, documents, max_chunks, max_doc_tokens,
                                             size=request.content_length)
                scores = await batcher_of(reranker).run(rows)
                tokens = sum(len(ids) for ids, _ in rows)
        except QueryTooLong as exc:
            raise invalid(str(exc), "query", "context_length_exceeded") from None
        except RerankFailed as exc:
            if exc.code == "rejected":
                raise invalid(str(exc), "documents", "context_length_exceeded") from None
            # As for chat: capacity and shutdown are 503s, anything else the engine's fault.
            raise EngineFailure(str(exc), exc.code, limits_of(request.app).retry_after_s).api_error() from None

        if self.pool.metrics is not None:
            self.pool.metrics.rerank(reranker.info.model_id, len(documents), tokens)
        best = best_per_document(np.asarray(scores, dtype=np.float32), owners, len(documents))
        order = sorted(range(len(documents)), key=lambda i: (-best[i], i))[: top_n or len(documents)]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": float(best[i])}
            if return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        reply = {"id": f"rerank-{uuid.uuid4().hex}", "model": reranker.info.model_id, "results": results,
                 "usage": {"total_tokens": tokens}}
        if version == 2:
            reply["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                             "tokens": {"input_tokens": tokens, "output_tokens": 0}}
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    @staticmethod
    def _llm_reranker(loaded: LoadedModel) -> LLMReranker:
        # Made per request (it only tokenizes the fixed prompt parts), so nothing here keeps
        # an unloaded model alive.
        try:
            return LLMReranker(loaded)
        except ValueError as exc:
            raise invalid(str(exc), "model", "model_not_supported") from None
