"""Groups concurrent encoder requests (embeddings, cross-encoder reranking) into shared
forward passes.

Requests queue their rows (token-id lists, or query-document pairs) and wait on a future.  One worker task per model takes
everything queued so far, runs it on the model's own thread (longest inputs first, in chunks
under a padded-token budget so one long text does not pad a hundred short ones), and hands
each request its rows.  While a pass runs, new requests gather in the queue and go together
in the next pass: throughput grows with load instead of requests waiting on a lock in turn.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("omlx.embeddings")

MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass
MAX_BATCH_ROWS = 256


def plan_chunks(lengths: list[int], max_tokens: int = MAX_BATCH_TOKENS, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Row indices grouped into passes, longest first; each pass's rows x longest row stays
    within `max_tokens` (a single row longer than that still gets its own pass)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            chunk = chunks[-1]
            width = lengths[chunk[0]]  # the longest, as rows are sorted
            if len(chunk) < max_rows and (len(chunk) + 1) * width <= max_tokens:
                chunk.append(i)
                continue
        chunks.append([i])
    return chunks


class PassBatcher:
    """`forward(rows) -> array` with one result row per input row, run on batches of rows
    gathered from every request waiting; `length(row)` is a row's token count."""

    def __init__(self, forward, length=len, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 max_batch_rows: int = MAX_BATCH_ROWS, thread_name: str = "omlx-encoder"):
        self.forward = forward
        self.length = length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self._pending: list[tuple[list[list[int]], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # MLX work stays on one thread per model, like the LLM engines.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    async def run(self, inputs: list) -> np.ndarray:
        """`forward`'s results for these rows, in order, computed beside other requests'."""
        if self._worker is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._run())
        future = self._loop.create_future()
        self._pending.append((inputs, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            taken, self._pending = self._pending, []
            taken = [(inputs, fut) for inputs, fut in taken if not fut.done()]  # drop the cancelled
            if taken:
                await self._serve(taken)

    async def _serve(self, taken) -> None:
        rows = [ids for inputs, _ in taken for ids in inputs]
        owners = [(n, r) for n, (inputs, _) in enumerate(taken) for r in range(len(inputs))]
        results: list[np.ndarray | None] = [None] * len(rows)
        try:
            for chunk in plan_chunks([self.length(r) for r in rows], self.max_batch_tokens, self.max_batch_rows):
                vectors = await self._loop.run_in_executor(self._executor, self.forward, [rows[i] for i in chunk])
                for i, vector in zip(chunk, vectors):
                    results[i] = vector
        except Exception as exc:
            log.exception("encoder pass failed")
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        per_request: list[list[np.ndarray]] = [[] for _ in taken]
        for (n, _), vector in zip(owners, results):
            per_request[n].append(vector)
        for (_, future), vectors in zip(taken, per_request):
            if not future.done():
                future.set_result(np.stack(vectors))

    def close(self) -> None:
        """Stop the worker (callable from any thread) and wait for a pass in progress."""
        if self._worker is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._worker.cancel)
        self._executor.shutdown(wait=True)


class EmbeddingBatcher(PassBatcher):
    def __init__(self, embedder, max_batch_tokens: int = MAX_BATCH_TOKENS, max_batch_rows: int = MAX_BATCH_ROWS):
        super().__init__(embedder.embed_token_ids, len, max_batch_tokens, max_batch_rows, "omlx-embed")
        self.embedder = embedder

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """`[len(inputs), hidden]` unit vectors for these token-id lists."""
        return await self.run(inputs)
