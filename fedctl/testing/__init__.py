"""Test helpers shipped with fedctl: an in-memory transport (memory.py), a fake clock (clock.py), a numpy MLP
trainer and a no-op trainer, hostile clients and WAN emulation."""
