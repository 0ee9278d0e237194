"""Seeing a federation while it runs: the broker's Prometheus metrics and its HTTP listener
(docs/observability.md)."""
