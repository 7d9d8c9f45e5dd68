"""Gradient decomposition and the edited forward pass, shared by MEND and KE.

For a linear layer ``y = W u`` (canonical ``[out, in]``) the gradient of a loss is a sum of
rank-one terms over the tokens, ``∇_W L = Σ_t δ_t u_tᵀ`` with ``δ_t = ∂L/∂y_t``.
:func:`decompose_gradient` collects ``(u_t, δ_t)`` of every edited layer in one forward and one
backward pass; an editor turns them into per-case low-rank updates (:class:`LowRankEdit`), which
:func:`edited_logits` applies through hooks (the weights are never written) and
:func:`edits_to_patch` turns into a :class:`~lightning_rome.patches.WeightPatch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_rome.editing.hypernet.rows import (
    IGNORE_INDEX,
    TokenRows,
    rows_to_device,
    target_row_nll,
)
from lightning_rome.hooks import module_hooks
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import forward_logits, model_device

__all__ = ["LowRankEdit", "Positions", "TokenFactors", "decompose_gradient", "edited_logits",
           "edits_to_patch", "group_by_case"]

Positions = Literal["target", "all"]


@dataclass
class TokenFactors:
    """The rank-one gradient factors of one weight, grouped by case (padded with zeros).

    Attributes:
        u: ``(C, K, d_in)`` layer inputs ``u_t``.
        delta: ``(C, K, d_out)`` output gradients ``δ_t = ∂L/∂y_t``.
        mask: ``(C, K)`` bool, real tokens (``False`` on padding, where ``u = δ = 0``).

    ``Σ_k delta[c, k] u[c, k]ᵀ`` is case ``c``'s share of ``∇_W L`` (canonical ``[out, in]``).
    """

    u: Tensor
    delta: Tensor
    mask: Tensor

    def gradient(self, case: int = 0) -> Tensor:
        """``Σ_t δ_t u_tᵀ`` of one case, ``(out, in)``."""
        return self.delta[case].T @ self.u[case]  # (out, in)


@dataclass
class LowRankEdit:
    """Per-case low-rank weight updates: ``ΔW_c = Σ_k left[c, k] right[c, k]ᵀ``.

    Attributes:
        left: ``(C, K, d_out)``.
        right: ``(C, K, d_in)``.
    """

    left: Tensor
    right: Tensor

    def dense(self, case: int = 0) -> Tensor:
        """``ΔW`` of one case, ``(out, in)``."""
        return self.left[case].T @ self.right[case]  # (out, in)


def group_by_case(x: Tensor, keep: Tensor, case_index: Tensor, n_cases: int,
                   ) -> tuple[Tensor, Tensor]:
    """Gather the kept tokens of each case's rows: ``x`` ``(N, T, d)`` → ``(C, K, d)`` + mask."""
    rows, pos = keep.nonzero(as_tuple=True)  # (P,), (P,)
    case = case_index.to(rows.device)[rows]  # (P,)
    counts = torch.bincount(case, minlength=n_cases)  # (C,)
    K = max(1, int(counts.max())) if counts.numel() else 1
    out = x.new_zeros((n_cases, K, x.shape[-1]))  # (C, K, d)
    mask = torch.zeros((n_cases, K), dtype=torch.bool, device=x.device)
    order = torch.argsort(case, stable=True)  # tokens of case 0 first, in row/position order
    case, rows, pos = case[order], rows[order], pos[order]
    starts = torch.cumsum(counts, 0) - counts  # (C,)
    slot = torch.arange(case.numel(), device=x.device) - starts[case]  # (P,)
    out[case, slot] = x[rows, pos]
    mask[case, slot] = True
    return out, mask


def decompose_gradient(
    model: nn.Module,
    rows: TokenRows,
    module_names: Sequence[str],
    *,
    positions: Positions | str = "target",
    case_index: Tensor | None = None,
    n_cases: int | None = None,
) -> dict[str, TokenFactors]:
    """``(u_t, δ_t)`` of each named linear module for the loss ``Σ_rows mean-token NLL(target)``,
    from one forward and one backward pass (the base weights need no gradient).

    ``δ_t`` is read by adding a zero tensor that requires grad to each module's output (so the
    forward values are unchanged) and differentiating the loss with respect to it.

    Args:
        model: the causal LM.
        rows: the edit rows ``x_e ‖ y_e`` (a :class:`TokenRows`).
        module_names: the edited linear modules.
        positions: ``"target"`` (positions predicting target tokens) or ``"all"`` (every real
            token: then ``TokenFactors.gradient()`` is the exact ``∇_W L``).
        case_index: ``(N,)`` the case each row belongs to (default: ``rows.case_index``); rows of
            one case pool their tokens (several requests edited together share a case).
        n_cases: the number of cases (default: ``max(case_index) + 1``).

    Returns:
        ``{module name: TokenFactors}``, float32, detached.
    """
    if positions not in ("target", "all"):
        raise ValueError(f"positions must be 'target' or 'all', got {positions!r}")
    device = model_device(model)
    rows = rows_to_device(rows, device)
    idx = (rows.case_index if case_index is None else case_index).to(device)
    C = int(idx.max()) + 1 if n_cases is None else n_cases
    names = list(module_names)
    zeros: dict[str, Tensor] = {}

    def add_zero(y: Tensor, name: str) -> Tensor:
        z = torch.zeros_like(y, requires_grad=True)  # ∂L/∂z = ∂L/∂y
        zeros[name] = z
        return y + z

    with torch.inference_mode(False), torch.enable_grad(), module_hooks(
            model, names, retain_input=True, edit_output=add_zero) as rec:
        logits = forward_logits(model, rows)  # (N, T, V)
        loss = target_row_nll(logits, rows).sum()
        grads = torch.autograd.grad(loss, [zeros[n] for n in names])
        # Grouped outside inference mode too: the factors are normal tensors, usable in the
        # editor's autograd graph also under Trainer.validate's inference mode.
        keep = (rows.predict_mask.bool() & (rows.labels != IGNORE_INDEX).any(1, keepdim=True)
                if positions == "target" else rows.attention_mask.bool())  # (N, T)
        out: dict[str, TokenFactors] = {}
        for n, g in zip(names, grads):
            u = rec[n].input
            if u is None:
                raise RuntimeError(f"module {n!r} was not called in the forward pass")
            u_c, mask = group_by_case(u.detach().float(), keep, idx, C)  # (C, K, d_in)
            d_c, _ = group_by_case(g.detach().float(), keep, idx, C)  # (C, K, d_out)
            out[n] = TokenFactors(u_c, d_c, mask)
    return out


def edited_logits(model: nn.Module, rows: TokenRows, edits: Mapping[str, LowRankEdit],
                  case_index: Tensor | None = None) -> Tensor:
    """Logits ``(N, T, V)`` of the model with ``W̃ = W + ΔW_c`` in each edited module, row ``i``
    using the edit of its case ``case_index[i]``. The weights are not touched: each edited
    module's output becomes ``y + ΔW_c u = y + Σ_k left_k (right_kᵀ u)``, differentiable with
    respect to the edit factors."""
    device = model_device(model)
    rows = rows_to_device(rows, device)
    idx = (rows.case_index if case_index is None else case_index).to(device)
    rec: dict[str, Any] = {}

    def add_delta(y: Tensor, name: str) -> Tensor:  # y: (N, T, d_out)
        u = rec[name].input  # (N, T, d_in), this pass's input
        e = edits[name]
        right = e.right[idx].float()  # (N, K, d_in)
        left = e.left[idx].float()  # (N, K, d_out)
        coeff = torch.einsum("ntd,nkd->ntk", u.float(), right)  # (N, T, K)
        return y + torch.einsum("ntk,nko->nto", coeff, left).to(y.dtype)  # (N, T, d_out)

    with module_hooks(model, list(edits), retain_input=True, detach=False,
                      edit_output=add_delta) as records:
        rec.update(records)
        return forward_logits(model, rows)


def edits_to_patch(model: nn.Module, edits: Mapping[str, LowRankEdit], *, case: int = 0,
                   method: str, hparams: Mapping[str, Any] | None = None,
                   requests: Sequence[EditRequest] = (), drop_padding: Tensor | None = None,
                   ) -> WeightPatch:
    """One case's edits as a :class:`WeightPatch` of :class:`LowRankDelta` ``left (out, K)``,
    ``right (K, in)`` keyed by parameter name, with the checksums of the current weights."""
    deltas: dict[str, LowRankDelta] = {}
    for module_name, e in edits.items():
        left, right = e.left[case], e.right[case]  # (K, out), (K, in)
        if drop_padding is not None:
            left, right = left[drop_padding], right[drop_padding]
        deltas[weight_param_name(module_name)] = LowRankDelta(
            left.T.detach().float().contiguous().cpu(), right.detach().float().contiguous().cpu())
    return WeightPatch.from_model(model, deltas, method=method, hparams=dict(hparams or {}),
                                  requests=list(requests))
