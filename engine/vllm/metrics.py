"""Per-replica Prometheus metrics, on the engine's registry (so /metrics exports them).

The request, token and latency metrics stay `EngineMetrics`' own: both backends fill them.
"""
from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.types import ReplicaState

STATES: tuple[ReplicaState, ...] = get_args(ReplicaState)


class ReplicaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.state = Gauge(
            "llm_replica_state", "1 for the state each vLLM replica is in", ["replica", "state"], registry=r
        )
        self.up = Gauge("llm_replica_up", "1 when the replica takes requests", ["replica"], registry=r)
        self.in_flight = Gauge("llm_replica_in_flight", "Requests streaming from the replica", ["replica"],
                               registry=r)
        self.requests = Counter(
            "llm_replica_requests", "Requests sent to a replica, by outcome (ok, error, cancelled, failover)",
            ["replica", "outcome"], registry=r,
        )
        self.failures = Counter("llm_replica_failures", "Times a replica was taken out", ["replica"], registry=r)
        self.adapter_loads = Counter(
            "llm_replica_adapter_loads", "Adapter registrations on a replica, by outcome", ["replica", "outcome"],
            registry=r,
        )

    def set_state(self, replica: str, state: ReplicaState) -> None:
        for s in STATES:
            self.state.labels(replica, s).set(1 if s == state else 0)
        self.up.labels(replica).set(1 if state == "ready" else 0)
