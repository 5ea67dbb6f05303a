"""Pieces of the reference blocks against their textbook formulas."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from pipeweaver.client import geometry  # noqa: E402
from pipeweaver.client.geometry import rope_tables, shared_rope_tables  # noqa: E402
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shared_rope_table_gives_the_computed_angles_bit_for_bit(dtype: torch.dtype) -> None:
    """A geometry's rotary tables come from rows of one shared table (grown as longer documents come): exactly
    what computing them at the positions gives, in the model's dtype; past the table's limit, computed."""
    geometry._ROPE_TABLES.clear()
    gen = torch.Generator().manual_seed(1)
    for longest in (3, 200, 700, 300):  # grows at 700 (256 -> 1,024 rows), then serves the shorter ones
        spans = [*torch.randint(1, longest + 1, (8,), generator=gen).tolist(), longest]
        positions = torch.cat([torch.arange(n) for n in spans])
        got = shared_rope_tables(positions, max(spans), 64, dtype)
        want = rope_tables(positions, 64, dtype)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert got[0].shape == (len(positions), 1, 64) and got[0].dtype == dtype
    (table,) = geometry._ROPE_TABLES.values()
    assert table[0].shape[0] == 1024
    far = torch.tensor([0, 70_000])
    assert all(
        torch.equal(g, w)
        for g, w in zip(shared_rope_tables(far, 70_001, 8, dtype), rope_tables(far, 8, dtype), strict=True)
    )
    assert len(geometry._ROPE_TABLES) == 1  # the long document did not build a 70,001-row table


def test_rms_norm_divides_by_the_root_mean_square() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0, dtype=torch.float64))
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-12)
