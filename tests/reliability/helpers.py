"""Shared pieces of the reliability suite: tiny editors, a synthetic second moment, snapshots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_rome.editing import FT, FTL, KN, MEMIT, ROME

CONTEXTS = ["{}", "Some text. {}"]


def second_moment(model: nn.Module, tok: Any, name: str) -> torch.Tensor:
    """A well-conditioned SPD matrix of the module's input size (no statistics run)."""
    d = model.get_submodule(name).weight.shape[0]  # Conv1D weight is (in, out)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)  # (d, 4d)
    return A @ A.T / (4 * d)  # (d, d)


EDITORS: dict[str, Callable[[], Any]] = {
    "rome": lambda: ROME({"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS},
                         second_moment=second_moment),
    # λ = 1: with the synthetic C, the published λ = 20000 gives updates so small that fp16 and
    # bf16 weights cannot represent them (refused, see test_low_precision.py).
    "memit": lambda: MEMIT({"layers": [0, 1], "v_num_grad_steps": 2, "mom2_update_weight": 1.0,
                            "context_templates": CONTEXTS}, second_moment=second_moment),
    "ft": lambda: FT({"layers": [1], "num_steps": 2}),
    "ft-l": lambda: FTL({"layers": [1], "num_steps": 2, "norm_constraint": 1e-3}),
    "kn": lambda: KN({"layers": [1], "steps": 2, "batch_size": 2}),
}

# Hyperparameters with a layer out of range of a 2-layer model, per editor.
BAD_LAYER: dict[str, Callable[[], Any]] = {
    "rome": lambda: ROME({"layer": 7, "v_num_grad_steps": 2, "context_templates": CONTEXTS},
                         second_moment=second_moment),
    "memit": lambda: MEMIT({"layers": [1, 7], "v_num_grad_steps": 2,
                            "context_templates": CONTEXTS}, second_moment=second_moment),
    "ft": lambda: FT({"layers": [-1], "num_steps": 2}),
    "ft-l": lambda: FTL({"layers": [2], "num_steps": 2, "norm_constraint": 1e-3}),
    "kn": lambda: KN({"layers": [9], "steps": 2, "batch_size": 2}),
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter bit-identical (same dtype, same bits) to the snapshot."""
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for n, p in now.items():
        assert p.dtype == before[n].dtype, n
        assert torch.equal(p.detach(), before[n]), f"parameter {n} changed"
