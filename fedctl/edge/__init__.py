"""Hierarchical aggregation: an *edge* broker is a broker to its own workers and one worker to its parent
(``fedctl serve --upstream``, docs/architecture.md "Edge brokers").

:mod:`fedctl.edge.link` is the hand-off between the two halves, :mod:`fedctl.edge.driver` the round driver of the
broker half, :mod:`fedctl.edge.uplink` the worker half. The parent needs no special mode: to it an edge is one
worker whose example count is its workers' sum.
"""
