"""/metrics: the engine's numbers in Prometheus' text format, through prometheus_client (chapter 10).

Names follow vLLM's (`vllm:num_requests_running` is `minillm:num_requests_running` here), so a Grafana
dashboard written for one reads the other. Two kinds of numbers:

    state, after every step      gauges: requests running / waiting / swapped, KV blocks used / free, KV usage,
                                 prefix-cache hit rate; counters: preemptions, prefix-cache queries and hits
                                 (tokens). With the CPU tier (EngineConfig.kv_offloading_size) also its used
                                 blocks, its hits (tokens), stored, loaded and evicted blocks
    state, when scraped          engine_sleep_state{sleep_state="awake" | "weights_offloaded" | "discard_all"}:
                                 1 for sleep mode's current state, 0 for the others
    per request, when it ends    histograms: time to first token, time per output token, end-to-end latency;
                                 counters: prompt and generation tokens, finished requests by reason

Everything is fed by one AsyncLLM step listener, on the event loop, from the engine's snapshot and the step's
RequestOutputs: the metrics never read the live scheduler. Each server has its own CollectorRegistry (not
prometheus_client's global one), so several servers in one process (tests, a notebook) do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from minillm.engine.async_llm import EngineSnapshot
from minillm.outputs import RequestOutput
from minillm.serve.metrics_reader import Metric, read_registry

CONTENT_TYPE = CONTENT_TYPE_LATEST
# latency buckets (seconds) from a GPU's few milliseconds per token to a loaded CPU's minutes per request
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0)


class ServerMetrics:
    """The collectors of one server; `on_step` is the AsyncLLM listener, `render()` the /metrics body."""

    def __init__(self, model_name: str, offload: bool = False) -> None:
        """`offload`: the engine has the prefix cache's CPU tier, whose collectors exist only then (as vLLM's)."""
        self.registry = registry = CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"minillm:{name}", doc, label, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"minillm:{name}", doc, label, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"minillm:{name}", doc, label, buckets=buckets, registry=registry).labels(model_name)

        self.running = gauge("num_requests_running", "Requests holding KV blocks and stepping.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for admission (new or recompute-preempted).")
        self.swapped = gauge("num_requests_swapped", "Requests whose KV blocks are swapped out to CPU memory.")
        self.blocks_used = gauge("kv_cache_blocks_used", "KV cache blocks held by requests.")
        self.blocks_free = gauge("kv_cache_blocks_free", "KV cache blocks an allocation can take (free or evictable).")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV cache blocks in use (0 to 1).")
        self.hit_rate = gauge("prefix_cache_hit_rate",
                              "Prompt tokens served from the prefix cache / prompt tokens looked up, since start.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (recompute or swap) since start.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        # snapshot field -> its counter: the engine keeps running totals, a counter takes their increase
        self._totals = {"num_preemptions": self.preemptions, "prefix_cache_queries": self.prefix_queries,
                        "prefix_cache_hits": self.prefix_hits}
        self.offload_used = None
        if offload:
            self._totals.update(
                offload_hits=counter("prefix_cache_offload_hits",
                                     "Of the prefix cache's hits, tokens loaded back from the CPU tier."),
                offload_stores=counter("kv_offload_store_blocks", "KV blocks the CPU tier stored (device to host)."),
                offload_loads=counter("kv_offload_load_blocks", "KV blocks the CPU tier loaded (host to device)."),
                offload_evictions=counter("kv_offload_evicted_blocks", "Entries the CPU tier's LRU dropped."))
            self.offload_used = gauge("kv_offload_used_blocks", "Host blocks of the CPU tier holding a stored block.")
        self._seen = dict.fromkeys(self._totals, 0)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between output tokens, per request.",
                              TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._finished = Counter("minillm:request_success", "Finished requests by finish reason.",
                                 ["model_name", "finished_reason"], registry=registry)
        self._sleep = Gauge("minillm:engine_sleep_state", "Sleep mode's state: 1 for the current one.",
                            ["model_name", "sleep_state"], registry=registry)
        self._model_name = model_name
        self._counted: dict[str, int] = {}  # request id -> output tokens already counted (unfinished only)

    def on_step(self, outputs: list[RequestOutput], snapshot: EngineSnapshot) -> None:
        self.running.set(len(snapshot.running))
        self.waiting.set(len(snapshot.waiting))
        self.swapped.set(len(snapshot.swapped))
        self.blocks_used.set(snapshot.num_used_blocks)
        self.blocks_free.set(snapshot.num_free_blocks)
        self.kv_usage.set(snapshot.num_used_blocks / snapshot.num_blocks if snapshot.num_blocks else 0.0)
        queries = snapshot.prefix_cache_queries
        self.hit_rate.set(snapshot.prefix_cache_hits / queries if queries else 0.0)
        if self.offload_used is not None:
            self.offload_used.set(snapshot.offload_used_blocks)
        for name, total_counter in self._totals.items():
            total = getattr(snapshot, name)
            if total > self._seen[name]:  # the engine's totals only grow (reset_prefix_cache keeps them)
                total_counter.inc(total - self._seen[name])
                self._seen[name] = total
        for out in outputs:
            self._count_tokens(out)

    def _count_tokens(self, out: RequestOutput) -> None:
        embedding = out.embedding is not None  # an embedding request: its prompt counts, its one token does not
        num_out = 0 if embedding else len(out.outputs[0].token_ids)
        before = self._counted.get(out.request_id)
        if before is None and (num_out or embedding):
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            before = 0
        if before is not None and num_out > before:
            self.generation_tokens.inc(num_out - before)
        if not out.finished:
            if before is not None:
                self._counted[out.request_id] = num_out
            return
        self._counted.pop(out.request_id, None)
        self._finished.labels(self._model_name, out.outputs[0].finish_reason or "unknown").inc()
        if out.outputs[0].finish_reason not in ("stop", "length") or embedding:
            return  # an aborted or failed request's latency says nothing about the service (as vLLM); an embedding
            # request has no token stream to time
        m = out.metrics
        for histogram, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.latency)):
            if value is not None:
                histogram.observe(value)

    def render(self, sleep_state: str = "awake") -> bytes:
        """The /metrics body; `sleep_state` is the engine's now (LLMEngine.sleep_state)."""
        self._set_sleep_state(sleep_state)
        return generate_latest(self.registry)

    def read(self, sleep_state: str = "awake") -> list[Metric]:
        """The same numbers as objects (metrics_reader.py: what LLM.get_metrics returns)."""
        self._set_sleep_state(sleep_state)
        return read_registry(self.registry)

    def _set_sleep_state(self, sleep_state: str) -> None:
        for state in ("awake", "weights_offloaded", "discard_all"):
            self._sleep.labels(self._model_name, state).set(1.0 if state == sleep_state else 0.0)
