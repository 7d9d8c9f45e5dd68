"""Canonical [out, in] weights: a write of W + Δ changes a module's output by exactly x Δᵀ, for
GPT-2's Conv1D ([in, out] storage) and nn.Linear alike."""

from __future__ import annotations

import pytest
import torch
from tiny_factories import D_FF, FAMILIES, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_rome.models import (
    canonical_weight,
    get_layout,
    is_transposed,
    set_canonical_weight,
    weight_param_name,
)


def test_orientation_of_conv1d_and_linear():
    conv, lin = Conv1D(nf=5, nx=3), nn.Linear(3, 5)
    assert is_transposed(conv) and not is_transposed(lin)
    assert tuple(conv.weight.shape) == (3, 5)  # stored [in, out]
    for m in (conv, lin):
        w = canonical_weight(m)
        assert tuple(w.shape) == (5, 3)
        assert w.data_ptr() == m.weight.data_ptr()  # a view, not a copy
        x = torch.randn(4, 3)
        torch.testing.assert_close(m(x), x @ w.T + m.bias)  # y = W x + b
    with pytest.raises(TypeError, match="LayerNorm is not a linear layer"):
        is_transposed(nn.LayerNorm(3))
    assert weight_param_name("transformer.h.0.mlp.c_proj") == "transformer.h.0.mlp.c_proj.weight"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", ["mlp_out", "mlp_in", "attn_out"])
def test_canonical_write_changes_output_by_x_delta_t(family, part):
    model = tiny_model(family)
    layout = get_layout(model)
    module = layout.module(model, part, 1)
    w = canonical_weight(module).detach().clone()  # (out, in)
    n_out, n_in = w.shape
    assert (n_out, n_in) == {"mlp_out": (32, D_FF[family]), "mlp_in": (D_FF[family], 32),
                             "attn_out": (32, 32)}[part]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, n_in, generator=gen)  # (B, T, in)
    delta = torch.randn(n_out, n_in, generator=gen)  # (out, in)
    with torch.no_grad():
        y0 = module(x)  # (B, T, out)
        set_canonical_weight(module, w + delta)
        y1 = module(x)
    torch.testing.assert_close(y1 - y0, x @ delta.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(canonical_weight(module), w + delta, rtol=0, atol=0)
    # Stored orientation: Conv1D keeps [in, out], nn.Linear [out, in].
    stored = module.weight
    expected = (w + delta).T if family == "gpt2" else w + delta
    assert torch.equal(stored, expected)


def test_set_canonical_weight_checks_shape_and_casts():
    conv = Conv1D(nf=5, nx=3).to(torch.bfloat16)
    before = conv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"expected \[out, in\] = \(5, 3\), got \(3, 5\)"):
        set_canonical_weight(conv, torch.zeros(3, 5))
    assert torch.equal(conv.weight, before)
    value = torch.randn(5, 3, dtype=torch.float64)
    set_canonical_weight(conv, value)
    assert conv.weight.dtype == torch.bfloat16
    assert torch.equal(conv.weight, value.to(torch.bfloat16).T)
    assert not conv.weight.requires_grad or conv.weight.grad is None
