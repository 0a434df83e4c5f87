"""Prometheus metrics of one Engine, on its own registry.

A registry per Engine (not the global default) so tests can run several engines in one
process and so the ops endpoint exports exactly what this process serves.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_requests", "Generation requests by adapter and outcome", ["adapter", "outcome"], registry=r
        )
        self.tokens = Counter("llm_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter(
            "llm_prompt_cached_tokens", "Prompt tokens whose keys and values came from the prefix cache", registry=r
        )
        self.tokens_per_second = Histogram(
            "llm_request_tokens_per_second", "Decode speed of each finished request",
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640), registry=r,
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "From submission to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "llm_queue_wait_seconds", "From submission to admission into the batch", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "llm_decode_step_seconds", "One batched forward step", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("llm_queue_depth", "Requests waiting for admission", registry=r)
        self.active = Gauge("llm_active_requests", "Requests decoding now", registry=r)
        self.batch_size = Gauge("llm_batch_size", "Rows in the last decode step", registry=r)
        self.resident_adapters = Gauge("llm_resident_adapters", "Adapter versions in memory", registry=r)
        self.adapter_loads = Counter(
            "llm_adapter_loads", "Adapter loads by outcome", ["adapter", "outcome"], registry=r
        )
        self.training_jobs = Counter(
            "llm_training_jobs", "Training jobs by outcome", ["domain", "outcome"], registry=r
        )


def process_rss_bytes() -> int:
    """This process's resident memory (Linux's /proc), for /status; 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
