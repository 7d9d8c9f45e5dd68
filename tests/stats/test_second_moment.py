"""SecondMoment: running sums, masking, merging, dtype handling."""

from __future__ import annotations

import pytest
import torch

from lightning_rome.stats import SecondMoment


def test_update_matches_direct_formula_and_ignores_masked_rows():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 5, 4, generator=g)  # (B, T, d)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    m = SecondMoment.zeros(4)
    assert m.update(k, mask) == 9
    K = torch.cat([k[0, :3], k[1], k[2, :1]]).double()  # (9, d)
    torch.testing.assert_close(m.mom2, K.T @ K / 9, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.mean, K.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.covariance(), torch.cov(K.T, correction=0), rtol=0, atol=1e-12)
    assert m.count == 9 and m.mom2.dtype == torch.float64


def test_bfloat16_keys_accumulate_in_float64():
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    m = SecondMoment.zeros(2)
    m.update(k)
    assert m.mom2_sum.dtype == torch.float64
    assert m.mom2_sum.tolist() == [[10.0, 14.0], [14.0, 20.0]]
    m32 = SecondMoment.zeros(2, dtype=torch.float32)
    m32.update(k)
    assert m32.mom2.dtype == torch.float32


def test_merge_adds_sums_and_counts():
    g = torch.Generator().manual_seed(1)
    a_k, b_k = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)
    a, b, both = SecondMoment.zeros(3), SecondMoment.zeros(3), SecondMoment.zeros(3)
    a.update(a_k)
    a.n_texts = 2
    b.update(b_k)
    b.n_texts = 1
    both.update(torch.cat([a_k, b_k]))
    merged = a + b
    assert merged.count == 12 and merged.n_texts == 3
    torch.testing.assert_close(merged.mom2, both.mom2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(merged.mean, both.mean, rtol=1e-14, atol=1e-14)
    assert a.count == 7  # merge does not modify its operands
    with pytest.raises(ValueError, match="dimension"):
        a.merge(SecondMoment.zeros(4))
    x, y = SecondMoment.zeros(3, module="m.a"), SecondMoment.zeros(3, module="m.b")
    with pytest.raises(ValueError, match="different modules"):
        x.merge(y)


def test_to_and_errors():
    m = SecondMoment.zeros(2)
    with pytest.raises(ValueError, match="no tokens"):
        _ = m.mom2
    m.update(torch.ones(1, 2))
    half = m.to(torch.float32)
    assert half.mom2.dtype == torch.float32 and m.dtype == torch.float64
    half.mom2_sum.add_(1)
    assert m.mom2_sum[0, 0].item() == 1.0  # a copy
    with pytest.raises(ValueError, match="dimension"):
        m.update(torch.ones(1, 3))
    with pytest.raises(ValueError, match="square"):
        SecondMoment(torch.zeros(2, 3))
