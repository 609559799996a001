"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["default", "all", "some"])
def kept_scratch(request, monkeypatch):
    """The CPU workspace (steadygrad.core.workspace) for none (these tensors are small), all or
    some of the test's parameters: large temporaries in kept memory must not change a value."""
    import steadygrad.core.workspace as workspace

    threshold = {"default": workspace.BIG_BYTES, "all": 0, "some": 100}[request.param]
    monkeypatch.setattr(workspace, "BIG_BYTES", threshold)
    return request.param
