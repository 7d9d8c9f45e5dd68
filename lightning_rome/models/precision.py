"""Refuse weight updates that the weights' dtype cannot represent.

In float16 (and for small updates in bfloat16) an update far below the weights' resolution
rounds away: the patch looks fine, but applying it changes (almost) no entry. Editors check each
update with :func:`check_update_representable` before returning it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_rome.models.weights import canonical_weight

__all__ = ["UnderflowError", "check_tuning_changed", "check_update_representable"]

MIN_CHANGED = 0.01  # refuse when fewer than this fraction of the updated entries would change


class UnderflowError(FloatingPointError):
    """An update rounds away in the weight's dtype (the model is left unchanged)."""


def check_update_representable(model: nn.Module, deltas: Mapping[str, object], method: str, *,
                               min_changed: float = MIN_CHANGED) -> None:
    """Raise :class:`UnderflowError` if adding a delta to its weight, in the weight's dtype (as
    :meth:`~lightning_rome.patches.WeightPatch.apply` does), would change fewer than
    ``min_changed`` of the entries the delta touches.

    Args:
        model: the model the deltas are for.
        deltas: ``{parameter name: delta}``; a delta is a canonical ``[out, in]`` tensor or
            anything with ``dense()`` (a :class:`~lightning_rome.patches.LowRankDelta`). An
            all-zero delta is not checked.
        method: the editor's name, for the message.
    """
    for name, delta in deltas.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        # (out, in) canonical view for weights; other parameters as they are
        w = canonical_weight(module) if leaf == "weight" else model.get_parameter(name)
        d = delta.dense() if hasattr(delta, "dense") else delta  # (out, in)
        assert isinstance(d, Tensor)
        d = d.detach().to(device=w.device, dtype=torch.float64 if w.dtype == torch.float64
                          else torch.float32)
        touched = d != 0
        n = int(touched.sum())
        if n == 0:
            continue
        w = w.detach()
        changed = int((((w.to(d.dtype) + d).to(w.dtype) != w) & touched).sum())
        if changed < min_changed * n:
            dtype = str(w.dtype).removeprefix("torch.")
            raise UnderflowError(
                f"{method}: the update of {name} underflows {dtype}: only {changed} of {n} "
                f"entries would change (max |Δ| {float(d.abs().max()):.3g}, mean |W| "
                f"{float(w.float().abs().mean()):.3g}); the edit would do nothing. Load the "
                "model in float32 to edit it (and cast it back after applying, if needed)")


def check_tuning_changed(deltas: Mapping[str, Tensor], dtypes: Mapping[str, torch.dtype],
                         method: str, *, min_changed: float = MIN_CHANGED) -> None:
    """Raise :class:`UnderflowError` if weights tuned in place in a low-precision dtype
    (float16, bfloat16) moved in fewer than ``min_changed`` of their entries: the optimiser's
    steps rounded away, and the edit would do nothing.

    Args:
        deltas: ``{parameter name: tuned minus original}``, any shape.
        dtypes: ``{parameter name: the dtype the weight was tuned in}``; float32 and float64
            weights are not checked (there a zero entry is a real zero gradient).
        method: the editor's name, for the message.
    """
    for name, d in deltas.items():
        dtype = dtypes[name]
        if dtype not in (torch.float16, torch.bfloat16) or d.numel() == 0:
            continue
        changed = int((d != 0).sum())
        if changed < min_changed * d.numel():
            raise UnderflowError(
                f"{method}: the tuned {name} changed in only {changed} of {d.numel()} entries: "
                f"the optimiser's steps round away in {str(dtype).removeprefix('torch.')}; "
                "the edit would do nothing. Load the model in float32 to edit it, or raise "
                "the learning rate")
