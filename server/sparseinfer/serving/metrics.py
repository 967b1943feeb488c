"""Prometheus metrics of one server, in its own registry (several servers can live in one process: tests).

Names follow Prometheus conventions (base units, ``_total`` counters); tokens/s is ``rate()`` of the token
counter, and ``sparseinfer_decode_tokens_per_second`` is the last decode step's own throughput. The
sparsity of served tokens: a histogram of each finished request's ``computed_share``, token-weighted counters
(served tokens and Σ tokens × computed_share) and FFN bytes read vs the dense equivalent.

The gauges an inference gateway schedules by (the Gateway API Inference Extension's model-server protocol;
docs/deployment.md), each 0 on an idle server:

- TotalQueuedRequests (vLLM ``vllm:num_requests_waiting``): ``sparseinfer_queue_length``, requests accepted
  and not yet prefilled (running ones are not counted);
- TotalRunningRequests (``vllm:num_requests_running``): ``sparseinfer_batch_size``, sequences in the batch;
- KVCacheUtilization (``vllm:kv_cache_usage_perc``, a fraction 0..1): ``sparseinfer_kv_cache_usage_ratio``,
  the share of KV-cache slots held by requests. A slot reserves a whole sequence's positions, so held slots,
  not filled positions, are what decides whether the next request must wait, as held blocks do in vLLM.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sparseinfer.serving.batcher import Observer
from sparseinfer.serving.requests import Completion

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SHARE = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics(Observer):
    """The batcher's observer plus the servicer's request counter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparseinfer_requests",
            "Finished RPCs by method and status",
            ["method", "code"],
            registry=r,
        )
        self.queue = Gauge("sparseinfer_queue_length", "Requests waiting for a batch slot", registry=r)
        self.batch = Gauge("sparseinfer_batch_size", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge(
            "sparseinfer_kv_cache_usage_ratio", "Share of KV-cache slots held by requests (0..1)", registry=r
        )
        self.step_batch = Histogram(
            "sparseinfer_decode_batch_size", "Sequences per decode step", buckets=_BATCH, registry=r
        )
        self.step_seconds = Histogram(
            "sparseinfer_step_seconds", "Duration of engine steps", ["kind"], buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "sparseinfer_time_to_first_token_seconds",
            "Accepted → first token sampled",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "sparseinfer_inter_token_latency_seconds",
            "Time between consecutive tokens of one request",
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens = Counter("sparseinfer_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("sparseinfer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.tokens_per_s = Gauge(
            "sparseinfer_decode_tokens_per_second", "Throughput of the last decode step", registry=r
        )
        self.computed_share = Histogram(
            "sparseinfer_request_computed_share",
            "Per finished request: share of FFN neurons computed vs dense",
            ["mode"],
            buckets=_SHARE,
            registry=r,
        )
        self.served_tokens = Counter(
            "sparseinfer_served_tokens", "Tokens whose FFNs ran (prompt + generated)", ["mode"], registry=r
        )
        self.computed_tokens = Counter(
            "sparseinfer_served_computed_tokens",
            "Σ tokens × computed_share: divided by sparseinfer_served_tokens_total it is the served sparsity",
            ["mode"],
            registry=r,
        )
        self.bytes_read = Counter(
            "sparseinfer_ffn_bytes_read", "FFN weight bytes the served requests needed", ["mode"], registry=r
        )
        self.bytes_dense = Counter(
            "sparseinfer_ffn_bytes_dense",
            "FFN bytes a dense FFN would read",
            ["mode"],
            registry=r,
        )
        self._http: object | None = None

    # ---- batcher observer (engine thread) ----
    def queue_length(self, n: int) -> None:
        self.queue.set(n)

    def batch_size(self, n: int) -> None:
        self.batch.set(n)

    def kv_cache(self, used: int, total: int) -> None:
        self.kv_usage.set(used / total if total else 0.0)

    def step(self, kind: str, tokens: int, seconds: float) -> None:
        self.step_seconds.labels(kind).observe(seconds)
        if kind == "decode":
            self.step_batch.observe(tokens)
            self.tokens.inc(tokens)
            if seconds > 0:
                self.tokens_per_s.set(tokens / seconds)
        else:  # a prefill samples the request's first token
            self.prompt_tokens.inc(tokens)
            self.tokens.inc(1)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def completed(self, completion: Completion) -> None:
        report = completion.sparsity
        self.computed_share.labels(report.mode).observe(report.computed_share)
        self.served_tokens.labels(report.mode).inc(report.tokens)
        self.computed_tokens.labels(report.mode).inc(report.tokens * report.computed_share)
        self.bytes_read.labels(report.mode).inc(report.ffn_bytes_read)
        self.bytes_dense.labels(report.mode).inc(report.ffn_bytes_dense)

    # ---- servicer ----
    def request_done(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def serve_http(self, host: str, port: int) -> int:
        """Start the text endpoint (its own thread); return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None
