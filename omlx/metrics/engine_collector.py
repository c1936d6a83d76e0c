"""What the engines and the model pool hold right now, read when Prometheus scrapes.

Queue lengths, KV use and resident bytes are gauges read straight from the pool.  The
engines' own counters (prefix-cache queries and hits, preemptions) are cumulative per loaded
engine; a model that is unloaded leaves its last values in `retired`, so each series stays
monotonic across unloads and reloads, as a Prometheus counter must.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "omlx:"
LABELS = ["model_name"]

# Engine counter name (without prefix and _total) -> (engine_stats() reader, help text).
ENGINE_COUNTERS = {
    "prefix_cache_queries": (lambda s: s["kv_cache"]["prefix_cache_query_tokens"],
                             "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": (lambda s: s["kv_cache"]["prefix_cache_hit_tokens"],
                          "Prompt tokens served from the prefix cache instead of computed."),
    "num_preemptions": (lambda s: s["preemptions"],
                        "Running requests sent back to wait because the KV cache was full."),
    # Speculative decoding (vLLM's names): draft tokens verified, and of those accepted.
    "spec_decode_num_draft_tokens": (lambda s: s["speculative_decoding"].get("drafted_tokens", 0),
                                     "Draft tokens verified by speculative decoding."),
    "spec_decode_num_accepted_tokens": (lambda s: s["speculative_decoding"].get("accepted_tokens", 0),
                                        "Draft tokens the model accepted."),
}


def engine_counter_values(engine_stats: dict) -> dict[str, float]:
    return {name: float(read(engine_stats)) for name, (read, _) in ENGINE_COUNTERS.items()}


class EngineCollector(Collector):
    def __init__(self, pool):
        self.pool = pool
        self.retired: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(ENGINE_COUNTERS, 0.0))

    def retire(self, model_name: str, engine_stats: dict) -> None:
        """Keep an engine's counters before it goes (the model is being unloaded)."""
        totals = self.retired[model_name]
        for name, value in engine_counter_values(engine_stats).items():
            totals[name] += value

    def describe(self):
        return []  # metric names vary with what is loaded; collect() is cheap enough to probe

    def collect(self):
        gauges = {
            "num_requests_running": "Requests in the engine's running batch.",
            "num_requests_waiting": "Requests waiting to be scheduled (queued or preempted).",
            "kv_cache_usage_perc": "Fraction of the KV cache's blocks in use (of what the pool may grow to), 0..1.",
            "kv_cache_bytes": "Bytes of KV cache allocated now (pools grow on demand).",
            "kv_cache_max_bytes": "Bytes the KV cache may grow to.",
            # Models with layers of other kinds (both are part of kv_cache_bytes too).
            "kv_cache_window_bytes": "Bytes of the sliding-window layers' own KV pool (bounded by the window).",
            "kv_cache_window_held_blocks": "Window-pool blocks held by running sequences.",
            "recurrent_state_bytes": "Bytes of recurrent-state slots and their prefix-cache snapshots.",
        }
        gauge = {name: GaugeMetricFamily(PREFIX + name, text, labels=LABELS) for name, text in gauges.items()}
        counter = {name: CounterMetricFamily(PREFIX + name, text, labels=LABELS)
                   for name, (_, text) in ENGINE_COUNTERS.items()}
        resident = GaugeMetricFamily(PREFIX + "model_resident_bytes",
                                     "Memory a resident model holds: weights plus KV cache.", labels=LABELS)
        live: dict[str, dict[str, float]] = {}
        for model_name, model in self.pool.loaded.items():
            if model is None:
                continue
            resident.add_metric([model_name], model.memory_bytes)
            if not model.generates:
                continue  # an encoder (embeddings, cross-encoder, speech to text): no generation engine
            stats = model.engine_stats()
            kv = stats["kv_cache"]
            max_blocks = kv["max_blocks"] or 1
            gauge["num_requests_running"].add_metric([model_name], stats["running"])
            gauge["num_requests_waiting"].add_metric([model_name], stats["waiting"])
            gauge["kv_cache_usage_perc"].add_metric([model_name], kv["used_blocks"] / max_blocks)
            gauge["kv_cache_bytes"].add_metric([model_name], kv["bytes"])
            gauge["kv_cache_max_bytes"].add_metric([model_name], kv["max_bytes"])
            if "window" in kv:
                gauge["kv_cache_window_bytes"].add_metric([model_name], kv["window"]["bytes"])
                gauge["kv_cache_window_held_blocks"].add_metric([model_name], kv["window"]["held_blocks"])
            if "state" in kv:
                gauge["recurrent_state_bytes"].add_metric([model_name], kv["state"]["bytes"] + kv["state"]["snapshot_bytes"])
            live[model_name] = engine_counter_values(stats)
        for model_name in sorted(set(live) | set(self.retired)):
            retired = self.retired.get(model_name, {})
            now = live.get(model_name, {})
            for name in ENGINE_COUNTERS:
                counter[name].add_metric([model_name], retired.get(name, 0.0) + now.get(name, 0.0))
        yield from gauge.values()
        yield from counter.values()
        yield resident
        yield GaugeMetricFamily(PREFIX + "memory_budget_bytes", "The model memory budget.",
                                value=self.pool.memory_budget)
        yield GaugeMetricFamily(PREFIX + "memory_used_bytes",
                                "Memory resident models hold, plus loads and unloads in progress.",
                                value=self.pool.used_bytes)
