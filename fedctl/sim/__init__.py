"""Simulation and experiments: many virtual workers on one machine over the real broker, sockets and codec."""
