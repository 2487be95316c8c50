"""collectors: one Prometheus collector per source (the kernel's counters, the socket polls, the detectors, the config), each described by a table of families."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


@dataclass(frozen=True)
class Family:
    """One metric family of a collector's table: name (a counter's without _total), kind, help,
    labels, and samples(source) -> iterable of (label values, value), for the source the
    collector read at this scrape. A histogram's samples() returns a counters.Histogram. samples()
    returning None leaves the family out of the scrape: a count this kernel cannot make is absent,
    not a zero that was never measured."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    samples: Callable

    def build(self, source):
        found = self.samples(source)
        if found is None:
            return None
        if self.kind == "histogram":
            hist = found
            buckets = [("+Inf" if math.isinf(b) else repr(b), c) for b, c in hist.buckets]
            return HistogramMetricFamily(self.name, self.help, buckets=buckets, sum_value=hist.sum_seconds)
        family = KINDS[self.kind](self.name, self.help, labels=list(self.labels))
        for label_values, value in found:
            family.add_metric(list(label_values), value)
        return family


def one(value) -> list:
    """The single sample of a family without labels."""
    return [((), value)]


def families(table: Iterable[Family], source):
    for family in table:
        if (built := family.build(source)) is not None:
            yield built
