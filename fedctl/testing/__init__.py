"""Test helpers shipped with fedctl: a numpy MLP trainer, a no-op trainer and in-process run helpers."""
