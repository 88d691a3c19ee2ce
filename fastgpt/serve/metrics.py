"""/metrics: the server's Prometheus series, in a registry of its own (prometheus-client).

    fastgpt_http_requests_total{endpoint, status}   every answered request, errors included
    fastgpt_requests_running / _waiting             sequences the scheduler runs / holds (a request's n
                                                    samples count n once forked)
    fastgpt_kv_blocks_used / _total                 paged KV-cache blocks held by sequences / in the cache
    fastgpt_samples_in_flight                       samples the server has admitted and not yet finished
                                                    (what --max-num-seqs + --max-queue bounds)
    fastgpt_prompt_tokens_total                     prompt tokens of requests that reached their first token
    fastgpt_generation_tokens_total                 tokens generated, over every sample
    fastgpt_request_aborts_total{reason}            requests stopped early: disconnect, shutdown, error
    fastgpt_time_to_first_token_seconds             arrival of the request -> its first token
    fastgpt_time_per_output_token_seconds           per sample: (last token - first token) / (tokens - 1)

The engine gauges are read when /metrics is scraped, from the stats the engine (its process or thread)
sends after each step. Latencies are measured in the server, from the request's arrival (its body
parsed), so they include queueing but not the network.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(self, stats, in_flight):
        """stats: a callable returning the engine's latest stats() dict; in_flight: one returning the
        samples admitted and not finished."""
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("fastgpt_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        running = Gauge("fastgpt_requests_running", "Sequences in the running batch", registry=r)
        waiting = Gauge("fastgpt_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        used = Gauge("fastgpt_kv_blocks_used", "KV-cache blocks held by sequences", registry=r)
        total = Gauge("fastgpt_kv_blocks_total", "KV-cache blocks in the paged cache", registry=r)
        running.set_function(lambda: stats()["running"])
        waiting.set_function(lambda: stats()["waiting"])
        used.set_function(lambda: stats()["total_blocks"] - stats()["free_blocks"])
        total.set_function(lambda: stats()["total_blocks"])
        Gauge("fastgpt_samples_in_flight", "Samples admitted and not yet finished", registry=r).set_function(in_flight)
        self.prompt_tokens = Counter("fastgpt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("fastgpt_generation_tokens", "Tokens generated", registry=r)
        self.aborts = Counter("fastgpt_request_aborts", "Requests stopped before they finished", ["reason"],
                              registry=r)
        self.ttft = Histogram("fastgpt_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("fastgpt_time_per_output_token_seconds",
                              "Per sample, (last token - first token) / (tokens - 1)", buckets=TPOT_BUCKETS,
                              registry=r)

    def count_http(self, path: str, status: int) -> None:
        self.http_requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
