"""Helpers for the metrics tests: read this process's registry, parse a scrape."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def value(name: str, **labels: str) -> float:
    """A sample of this process's default registry; 0 for a series that does not exist."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scraped(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A scrape's samples as ``{(name, frozenset(labels.items())): value}``."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    """The sum of the scraped samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, have), v in samples.items()
               if n == name and set(labels.items()) <= have)
