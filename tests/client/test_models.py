"""Pieces of the reference blocks against their textbook formulas."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from pipeweaver.client.geometry import rope_tables  # noqa: E402
from pipeweaver.client.models import RMSNorm, apply_rope  # noqa: E402


def test_rope_rotates_each_pair_by_position_times_frequency() -> None:
    """Rotate-half RoPE: dims i and i + d/2 of a token at position p turn by p / 10000^(i / (d/2))."""
    gen = torch.Generator().manual_seed(0)
    d, heads = 8, 3
    positions = torch.tensor([0, 1, 2, 0, 5, 17])
    x = torch.randn(len(positions), heads, d, generator=gen, dtype=torch.float64)
    cos, sin = rope_tables(positions, d, torch.float64)
    got = apply_rope(x, cos, sin)
    half = d // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = p / 10000.0 ** (i / half)
            a, b = x[t, :, i], x[t, :, i + half]
            assert torch.allclose(got[t, :, i], a * math.cos(angle) - b * math.sin(angle), atol=1e-6)
            assert torch.allclose(got[t, :, i + half], b * math.cos(angle) + a * math.sin(angle), atol=1e-6)
    assert not cos.requires_grad and not sin.requires_grad


def test_rms_norm_divides_by_the_root_mean_square() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0, dtype=torch.float64))
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-12)
