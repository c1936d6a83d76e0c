"""The server's Prometheus metrics, named after vLLM's under an `omlx:` prefix and labelled
by `model_name`.

Events feed the counters and histograms (a request finishing, a model loading or being
evicted, an embeddings or rerank call); `EngineCollector` reads queue lengths, KV use, prefix-cache and
preemption counters and memory from the pool when scraped.  Each server has its own registry,
so several apps in one process (tests) never share counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine_collector import LABELS, PREFIX, EngineCollector
from .request_timer import FinishedRequest, RequestTimer

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")

log = logging.getLogger("omlx.metrics")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.engines: EngineCollector | None = None
        # Others who want each finished request (the admin panel's running statistics).
        self.request_listeners: list[Callable[[FinishedRequest], None]] = []
        r = self.registry

        def counter(name, text, labels=LABELS):
            return Counter(PREFIX + name, text, labels, registry=r)

        def histogram(name, text, buckets):
            return Histogram(PREFIX + name, text, LABELS, buckets=buckets, registry=r)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests, as their usage reported.")
        self.generation_tokens = counter("generation_tokens",
                                         "Generated tokens of finished requests, as their usage reported.")
        self.request_success = counter("request_success", "Finished requests by how they ended.",
                                       [*LABELS, "finished_reason"])
        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from submission to the engine to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens of a completion.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from submission to the last token.",
                             LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time a request waited before it was first scheduled.",
                               LATENCY_BUCKETS)
        self.model_loads = counter("model_loads", "Models loaded into memory.")
        self.model_load_failures = counter("model_load_failures", "Model loads that failed.")
        self.model_evictions = counter("model_evictions", "Idle models unloaded to make room for another.")
        self.embedding_requests = counter("embedding_requests", "Embeddings requests served.")
        self.embedding_inputs = counter("embedding_inputs", "Texts (or token lists) embedded.")
        self.embedding_tokens = counter("embedding_tokens", "Tokens embedded, as the responses' usage reported.")
        self.rerank_requests = counter("rerank_requests", "Rerank calls served.")
        self.rerank_documents = counter("rerank_documents", "Documents scored by rerank calls.")
        self.rerank_tokens = counter("rerank_tokens", "Tokens scored by rerank calls, as their usage reported.")

    def watch(self, pool) -> None:
        """Read the pool's engines (queues, KV, prefix cache, memory) at every scrape."""
        self.engines = EngineCollector(pool)
        self.registry.register(self.engines)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events
    def request_timer(self, model_name: str, prompt_tokens: int, choices: int = 1) -> RequestTimer:
        return RequestTimer(model_name, prompt_tokens, choices, self.request_finished)

    def request_finished(self, done: FinishedRequest) -> None:
        model = done.model_name
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.generation_tokens.labels(model).inc(done.generation_tokens)
        self.request_success.labels(model, done.finished_reason).inc()
        self.e2e.labels(model).observe(done.e2e_s)
        if done.queue_s is not None:
            self.queue.labels(model).observe(done.queue_s)
        if done.ttft_s is not None:
            self.ttft.labels(model).observe(done.ttft_s)
        itl = self.itl.labels(model)
        for gap in done.itl_s:
            itl.observe(gap)
        for listener in self.request_listeners:
            try:
                listener(done)
            except Exception:  # statistics must never fail the request they describe
                log.exception("a request listener failed")

    def model_loaded(self, model_name: str) -> None:
        self.model_loads.labels(model_name).inc()

    def model_load_failed(self, model_name: str) -> None:
        self.model_load_failures.labels(model_name).inc()

    def model_evicted(self, model_name: str) -> None:
        self.model_evictions.labels(model_name).inc()

    def model_unloading(self, model_name: str, model) -> None:
        """Keep an LLM engine's counters before it stops (see EngineCollector.retire)."""
        stats = getattr(model, "engine_stats", None)
        if self.engines is not None and stats is not None:
            self.engines.retire(model_name, stats())

    def embeddings(self, model_name: str, inputs: int, tokens: int) -> None:
        self.embedding_requests.labels(model_name).inc()
        self.embedding_inputs.labels(model_name).inc(inputs)
        self.embedding_tokens.labels(model_name).inc(tokens)

    def rerank(self, model_name: str, documents: int, tokens: int) -> None:
        self.rerank_requests.labels(model_name).inc()
        self.rerank_documents.labels(model_name).inc(documents)
        self.rerank_tokens.labels(model_name).inc(tokens)
