"""The allocator setting changes where tensors live, not what is computed."""

import ctypes.util

import pytest
import torch

from dpolens.runtime import tune_allocator


def test_the_allocator_is_tuned_on_glibc_and_left_alone_when_asked(monkeypatch):
    if not ctypes.util.find_library("c"):
        pytest.skip("no C library to tune")
    monkeypatch.setenv("DPOLENS_MALLOC", "default")
    assert tune_allocator() is False
    monkeypatch.delenv("DPOLENS_MALLOC")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 700, generator=g), torch.randn(700, 900, generator=g)
    before = a @ b
    assert tune_allocator() is True
    big = [torch.ones(4096, 4096) for _ in range(3)]  # 64 MiB each, now from the heap
    assert all(float(t.sum()) == 4096 * 4096 for t in big)
    assert torch.equal(a @ b, before)
