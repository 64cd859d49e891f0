"""The /metrics collectors (metrics.py, chapter 10) read back as plain Python objects: what `LLM.get_metrics()`
returns (vLLM's vllm.v1.metrics.reader), for a notebook or a script that wants the numbers without scraping an
HTTP endpoint.

Each collector becomes one object per label set: a Counter (its running total), a Gauge (its value now) or a
Histogram (observations, their sum, and the cumulative count at or below each bucket's upper bound, keyed by the
bound as Prometheus writes it: "0.005", ..., "+Inf"). Names are the exposed ones ("minillm:num_preemptions";
Prometheus' `_total` suffix is not part of a counter's name).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry


@dataclass
class Metric:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Counter(Metric):
    value: int = 0


@dataclass
class Gauge(Metric):
    value: float = 0.0


@dataclass
class Histogram(Metric):
    count: int = 0
    sum: float = 0.0
    buckets: dict[str, int] = field(default_factory=dict)  # upper bound -> observations <= it (cumulative)


def read_registry(registry: CollectorRegistry) -> list[Metric]:
    """Every counter, gauge and histogram of `registry`, one Metric per label set, in registration order."""
    metrics: list[Metric] = []
    for family in registry.collect():
        if family.type == "counter":
            metrics += [Counter(family.name, dict(s.labels), int(s.value)) for s in family.samples
                        if s.name == family.name + "_total"]
        elif family.type == "gauge":
            metrics += [Gauge(family.name, dict(s.labels), float(s.value)) for s in family.samples]
        elif family.type == "histogram":
            series: dict[tuple, Histogram] = {}
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = series.setdefault(tuple(sorted(labels.items())), Histogram(family.name, labels))
                if s.name.endswith("_bucket"):
                    h.buckets[s.labels["le"]] = int(s.value)
                elif s.name.endswith("_count"):
                    h.count = int(s.value)
                elif s.name.endswith("_sum"):
                    h.sum = float(s.value)
            metrics += series.values()
    return metrics
