"""fedctl: privacy-preserving federated learning over ZeroMQ (broker, workers, wire protocol, strategies)."""

__version__ = "0.1.0"
