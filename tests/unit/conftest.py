"""Fixtures shared by the unit tests of the framework adapters."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["torch", "mxnet"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each framework in turn (skipped only on a single-framework install; in the dev environment both run)."""
    pytest.importorskip(str(request.param))
    return str(request.param)


@pytest.fixture(scope="module")
def both() -> None:
    """Both frameworks, for cross-framework comparisons."""
    pytest.importorskip("torch")
    pytest.importorskip("mxnet")
