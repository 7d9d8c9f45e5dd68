"""The one place that knows how a linear layer stores its weight.

``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``. Every editor works in
the canonical ``[out, in]`` orientation, so that ``y = W k`` reads like the papers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["canonical_weight", "is_transposed", "set_canonical_weight", "weight_param_name"]


def is_transposed(module: nn.Module) -> bool:
    """True when ``module.weight`` is stored ``[in, out]`` (``transformers``' ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    raise TypeError(f"module {type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


def canonical_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as an ``[out, in]`` view (no copy)."""
    w = module.weight
    return w.T if is_transposed(module) else w


@torch.no_grad()
def set_canonical_weight(module: nn.Module, value: Tensor) -> None:
    """Write ``value`` (``[out, in]``) into the module's weight, in place, in its own orientation
    and dtype."""
    target = canonical_weight(module)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"weight shape mismatch: expected [out, in] = {tuple(target.shape)}, "
                         f"got {tuple(value.shape)}")
    target.copy_(value.to(dtype=target.dtype, device=target.device))


def weight_param_name(module_name: str) -> str:
    """The parameter name of a linear module's weight."""
    return f"{module_name}.weight"
