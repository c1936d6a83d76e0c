"""`POST /v1/embeddings` (OpenAI shape) over the mlx-embeddings models in the pool.

Input may be a string, a list of strings, a list of token ids or a list of token-id lists.
Texts longer than the model's maximum sequence length are truncated, as sentence-transformers
does.  `dimensions` keeps the first N components and re-normalises them to unit length (the
Matryoshka convention); `encoding_format: base64` sends little-endian float32 bytes.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson
from aiohttp import web

from omlx.embeddings.batcher import EmbeddingBatcher
from omlx.embeddings.model import LoadedEmbedder
from omlx.embeddings.packaged import DEFAULT_EMBEDDING_MODEL
from omlx.models.pool import ModelPool

from .errors import invalid
from .model_access import lease_for_request
from .offload import offload
from .prompt_bound import longest_token_chars, word_cut
from .wire import read_json

MAX_INPUTS = 2048


def parse_input(value) -> list[str | list[int]]:
    """The request's inputs as a list of texts and/or token-id lists."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        value = [value]  # one input given as token ids
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a non-empty string, list of strings, or list of token ids", "input", "invalid_value")
    if len(value) > MAX_INPUTS:
        raise invalid(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", "input", "invalid_value")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise invalid(f"'input[{i}]' is an empty string", "input", "invalid_value")
        elif isinstance(item, list):
            if not item or not all(_is_token(t) for t in item):
                raise invalid(f"'input[{i}]' must be a non-empty list of non-negative token ids", "input", "invalid_value")
        else:
            raise invalid(f"'input[{i}]' must be a string or a list of token ids", "input", "invalid_type")
    return value


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def truncate_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def encode_vector(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def batcher_of(embedder: LoadedEmbedder) -> EmbeddingBatcher:
    if embedder.batcher is None:
        embedder.batcher = EmbeddingBatcher(embedder)
    return embedder.batcher


class EmbeddingRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/embeddings", self.embeddings)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request)  # the shared read timeout, JSON and nesting checks
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        model = body.get("model") or DEFAULT_EMBEDDING_MODEL
        if not isinstance(model, str):
            raise invalid("'model' must be a string", "model", "invalid_type")
        inputs = parse_input(body.get("input"))
        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format", "invalid_value")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
            raise invalid("'dimensions' must be a positive integer", "dimensions", "invalid_value")

        embedder: LoadedEmbedder = await lease_for_request(request, self.pool, model, "embedding")
        if dimensions is not None and dimensions > embedder.dimensions:
            raise invalid(f"'dimensions' is {dimensions}, but this model's embeddings have "
                          f"{embedder.dimensions}", "dimensions", "invalid_value")
        # Tokenizing scales with the body: off the event loop (omlx.api.offload).
        token_ids = await offload(_token_ids, embedder, inputs, size=request.content_length)
        vectors = await batcher_of(embedder).embed(token_ids)
        if dimensions is not None:
            vectors = truncate_dimensions(vectors, dimensions)
        tokens = sum(len(t) for t in token_ids)
        if self.pool.metrics is not None:
            self.pool.metrics.embeddings(embedder.model_id, len(token_ids), tokens)
        return web.Response(
            body=orjson.dumps({
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
                         for i, v in enumerate(vectors)],
                "model": embedder.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }),
            content_type="application/json",
        )


def _token_ids(embedder: LoadedEmbedder, inputs: list) -> list[list[int]]:
    """Each input's token ids, truncated to the model's length.  A string far longer than
    that is cut first (where a word ends, past what `max_length` tokens can cover), so a
    20 MiB input costs what its first tokens cost.  CPU work: run it in the offload pool."""
    token_ids = []
    vocab = embedder.vocab_size
    reach = (embedder.max_length + 64) * longest_token_chars(embedder.tokenizer)
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if len(item) > reach:
                item = item[: word_cut(item, reach) or reach]
            token_ids.append(embedder.tokenize(item))
        else:
            if max(item) >= vocab:
                raise invalid(f"'input[{i}]' has token ids outside the vocabulary (size {vocab})", "input", "invalid_value")
            token_ids.append(item[: embedder.max_length])
    return token_ids
