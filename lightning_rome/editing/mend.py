"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

MEND edits chosen weight matrices ``W_ℓ`` (by default ``W_out`` of the last three MLPs) with a
small trained network that transforms the fine-tuning gradient of the edit into a weight update.

**Gradient decomposition.** For a linear layer ``y = W u`` (canonical ``[out, in]``), the gradient
of a loss ``L`` is a sum of rank-one terms over the tokens ``t``::

    ∇_W L = Σ_t δ_t u_tᵀ,      δ_t = ∂L/∂y_t,  u_t the layer input at token t.

:func:`decompose_gradient` collects ``(u_t, δ_t)`` of every edited layer in **one forward and one
backward pass** of the edit example ``x_e ‖ y_e`` (``L`` = the mean per-token NLL of ``y_e``, summed
over edit rows). By default (``positions="target"``) it keeps the tokens whose logits predict a
target token; ``positions="all"`` keeps every real token, and then ``Σ_t δ_t u_tᵀ`` *is* the exact
gradient.

**Editor network** (:class:`MENDNet`, the paper's §3.1). The inputs are normalised to zero mean
and unit variance per coordinate with running statistics (:class:`RunningMoments`, updated while
training only), concatenated ``z = [u; δ] ∈ R^{m}`` (``m = d_in + d_out``) and passed through
``n_blocks`` residual low-rank blocks::

    h ← h + s_ℓ ⊙ (U ReLU(V h + b)) + o_ℓ,     U ∈ R^{m×r} (zero at init), V ∈ R^{r×m}

so the network starts as the exact identity. ``U, V, b`` are shared by all edited layers of the
same shape; the scale ``s_ℓ`` (init 1) and offset ``o_ℓ`` (init 0) are per layer (the paper's
layer-specific modulation). The output splits into the pseudo-activation ``ũ`` and pseudo-delta
``δ̃``. *Deviation:* the paper writes the block as ``h + σ(s ⊙ (U V h + b) + o)``; with the
identity initialisation ``U = 0`` the ReLU's input is then exactly 0, where its gradient is 0, so
no parameter but ``α`` would ever receive a gradient. Placing the ReLU inside the rank-``r``
bottleneck (a residual MLP with a hidden layer of width ``r``) keeps the identity at
initialisation and trains.

**Edit.** ``W̃_ℓ = W_ℓ − α_ℓ Σ_t δ̃_t ũ_tᵀ`` with a learned step size ``α_ℓ`` per layer
(initialised to ``edit_lr``): a low-rank delta, returned as a
:class:`~lightning_rome.patches.WeightPatch` of :class:`~lightning_rome.patches.LowRankDelta`
factors ``left = −α δ̃ᵀ`` ``(out, K)``, ``right = ũ`` ``(K, in)`` (``K`` = number of target tokens).

**Training** (:func:`mend_losses`, used by :class:`lightning_rome.modules.MENDModule`)::

    L_MEND = c_edit · L_e + c_loc · L_loc
    L_e    = −log p_θ̃(y_e | x_e')                (mean per-token NLL on equivalence inputs x_e')
    L_loc  = KL(p_θ(· | x_loc) ‖ p_θ̃(· | x_loc))  (mean over the locality rows' predicted tokens)

with the paper's ``c_edit = 0.1``, ``c_loc = 1``. The edited model ``θ̃`` is never materialised:
:func:`edited_logits` adds ``ΔW u`` to the output of each edited layer through
:func:`lightning_rome.hooks.module_hooks`, a differentiable function of the editor's parameters;
the base model's weights are never written. Each case of a batch is edited independently (its own
``ΔW_c`` applied to its own rows) within one batched forward pass.

The paper's settings for GPT-style models are the presets in ``presets/mend.yaml``: rank 1920,
``edit_lr`` (initial α) 1e-4, Adam with lr 1e-6 for the network and 1e-4 for α.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.hparams import NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.hooks import module_hooks
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import eval_mode, in_eval_mode
from lightning_rome.models.weights import canonical_weight, weight_param_name
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest, as_requests, check_batch
from lightning_rome.scoring import (
    encode_pairs,
    forward_logits,
    model_device,
    teacher_forced_rows,
)
from lightning_rome.tokens import subject_span
from lightning_rome.utils.io import tensor_checksum
from lightning_rome.utils.modules import unwrap_model

__all__ = [
    "CHECKPOINT_KEY",
    "EditorMismatchError",
    "LowRankEdit",
    "MENDEditor",
    "MENDHyperParams",
    "MENDNet",
    "MENDNetwork",
    "RunningMoments",
    "TokenFactors",
    "TokenRows",
    "decompose_gradient",
    "edit_rows",
    "edited_logits",
    "edits_to_patch",
    "locality_agreement",
    "locality_kl",
    "mend_losses",
    "resolve_layers",
    "target_accuracy",
    "target_row_nll",
    "weights_fingerprint",
]

Positions = Literal["target", "all"]
IGNORE_INDEX = -100
#: The key under which the editor checkpoints keep the base model's name, the edited parameters,
#: their shapes and the fingerprint (SHA-256) of their weights.
CHECKPOINT_KEY = "lightning_rome_editor"
CHECKPOINT_FORMAT = "lightning_rome.hypernetwork_editor"


class EditorMismatchError(ValueError):
    """A trained editor does not fit the model: a missing parameter, another shape, or weights
    other than those it was trained on (the fingerprint differs)."""


# ----------------------------------------------------------------------------------------------
# Hyperparameters


@dataclasses.dataclass
class MENDHyperParams(HyperParams):
    """MEND's settings (paper defaults; small values for tests come from the caller).

    Attributes:
        layers: the layers whose ``part`` weight is edited; ``None``: the last three layers.
        part: the layout part edited (``mlp_out``, the MLP's ``W_out``).
        rank: the rank ``r`` of the editor network's low-rank matrices (1920 in the paper).
        n_blocks: residual low-rank blocks of the editor network (2 in the paper).
        share: share ``U, V, b`` between edited layers of the same shape (the paper does).
        edit_lr: the initial per-layer step size ``α_ℓ`` (1e-4 in the paper).
        lr: Adam learning rate of the editor network (1e-6 in the paper).
        lr_alpha: Adam learning rate of the step sizes ``α`` (1e-4 in the paper).
        c_edit: the weight of the edit loss ``L_e`` (0.1 in the paper).
        c_loc: the weight of the locality loss ``L_loc`` (1 in the paper).
        positions: the tokens whose ``(u, δ)`` make the edit: ``"target"`` (the positions
            predicting the target's tokens) or ``"all"`` (every real token of ``x_e ‖ y_e``).
        norm_eps: added to the running standard deviation when normalising inputs.
    """

    METHOD = "mend"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layers": Num(integer=True, optional=True, depth=1), "rank": POSITIVE_INT,
        "n_blocks": POSITIVE_INT, "edit_lr": NONNEG, "lr": POSITIVE, "lr_alpha": NONNEG,
        "c_edit": NONNEG, "c_loc": NONNEG, "norm_eps": POSITIVE,
    }

    layers: list[int] | None = None
    part: str = "mlp_out"
    rank: int = 1920
    n_blocks: int = 2
    share: bool = True
    edit_lr: float = 1e-4
    lr: float = 1e-6
    lr_alpha: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    positions: str = "target"
    norm_eps: float = 1e-7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and not self.layers:
            raise ValueError("MEND needs at least one layer (or layers=None for the last three)")
        if self.positions not in ("target", "all"):
            raise ValueError(f"positions must be 'target' or 'all', got {self.positions!r}")


def resolve_layers(model: nn.Module, layers: Sequence[int] | None, layout: ModelLayout,
                   default_last: int = 3) -> list[int]:
    """The edited layers: ``layers`` checked against the model, or its last ``default_last``.

    Raises:
        IndexError: a layer does not exist (the message gives the model's layer range).
        ValueError: a layer is listed twice.
    """
    n = layout.n_layers(model)
    out = list(range(max(0, n - default_last), n)) if layers is None else list(layers)
    for layer in out:
        layout.check_layer(model, layer)
    if len(set(out)) != len(out):
        raise ValueError(f"layers must be distinct, got {out}")
    return out


def edited_weights(model: nn.Module, layers: Sequence[int], part: str, layout: ModelLayout,
                   ) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{parameter name: (module name, canonical (out, in) shape)}`` of the edited weights."""
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    for layer in layers:
        module_name = layout.name(part, layer)
        module = layout.module(model, part, layer)
        w = canonical_weight(module)  # (out, in); raises TypeError for a non-linear module
        out[weight_param_name(module_name)] = (module_name, (int(w.shape[0]), int(w.shape[1])))
    return out


def weights_fingerprint(model: nn.Module, param_names: Sequence[str]) -> dict[str, str]:
    """SHA-256 (:func:`~lightning_rome.utils.io.tensor_checksum`) of each named weight."""
    return {n: tensor_checksum(model.get_parameter(n)) for n in param_names}


def check_editor_fits(model: nn.Module, shapes: Mapping[str, Sequence[int]],
                      fingerprint: Mapping[str, str] | None, *, trained_on: str | None = None,
                      ) -> None:
    """Raise :class:`EditorMismatchError` unless every edited weight exists with its shape and,
    when a fingerprint is given, holds exactly the bits the editor was trained against."""
    where = f" (trained on {trained_on!r})" if trained_on else ""
    for name, shape in shapes.items():
        try:
            module_name = name.rpartition(".")[0]
            w = canonical_weight(model.get_submodule(module_name))
        except (AttributeError, TypeError) as e:
            raise EditorMismatchError(f"the editor{where} edits {name!r}, which this model does "
                                      f"not have as a linear weight ({e})") from e
        if tuple(w.shape) != tuple(shape):
            raise EditorMismatchError(f"the editor{where} edits {name!r} of shape {tuple(shape)}, "
                                      f"this model's is {tuple(w.shape)}")
    if fingerprint:
        for name, digest in fingerprint.items():
            if tensor_checksum(model.get_parameter(name)) != digest:
                raise EditorMismatchError(
                    f"the weights of {name!r} differ from those the editor{where} was trained on "
                    "(fingerprint mismatch): a hypernetwork editor only fits the model it was "
                    "trained for; pass check_fingerprint=False to use it anyway")


# ----------------------------------------------------------------------------------------------
# Token rows and losses


class TokenRows(Protocol):
    """What the functions below read from a batch of ``prompt ‖ target`` rows; a
    :class:`lightning_rome.data.LabeledBatch` is one (see :func:`edit_rows`)."""

    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T)
    position_ids: Tensor  # (N, T)
    labels: Tensor  # (N, T), -100 off target
    predict_mask: Tensor  # (N, T) bool, positions whose logits predict a target token
    case_index: Tensor  # (N,)


@dataclass
class _Rows:
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    predict_mask: Tensor
    case_index: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def edit_rows(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
              targets: Sequence[str], case_index: Sequence[int] | None = None,
              device: torch.device | str | None = None) -> _Rows:
    """``encode_prompt(prompt) + continuation_ids(target)`` rows, right-padded, labelled on the
    target (the conventions of :mod:`lightning_rome.scoring` and
    :func:`lightning_rome.data.labeled_batch`)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need equally many prompts and targets, got {len(prompts)} and "
                         f"{len(targets)}")
    tf = teacher_forced_rows(tokenizer, *encode_pairs(tokenizer, prompts, targets),
                             side="right", full_target=True)
    idx = torch.arange(len(prompts)) if case_index is None else torch.as_tensor(list(case_index))
    rows = _Rows(tf.batch.input_ids, tf.batch.attention_mask, tf.batch.position_ids,
                 tf.labels(IGNORE_INDEX), tf.predict_mask(), idx.long())
    return _to_device(rows, device) if device is not None else rows


def _plain(t: Tensor, device: torch.device | None = None) -> Tensor:
    """A tensor usable in autograd: inference tensors (batches moved under Lightning's
    ``inference_mode``) are cloned outside inference mode."""
    if device is not None and t.device != device:
        t = t.to(device)
    return t.clone() if t.is_inference() else t


def _to_device(rows: Any, device: torch.device | str | None) -> _Rows:
    dev = torch.device(device) if device is not None else None
    return _Rows(*(_plain(getattr(rows, k), dev) for k in (
        "input_ids", "attention_mask", "position_ids", "labels", "predict_mask")),
        _plain(_case_index(rows), dev))


def _case_index(rows: Any) -> Tensor:
    idx = getattr(rows, "case_index", None)
    return torch.arange(rows.input_ids.shape[0]) if idx is None else idx


def _token_logp(logits: Tensor, rows: TokenRows) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token at the position predicting it, and the mask."""
    target = rows.labels[:, 1:]  # (N, T-1)
    valid = target != IGNORE_INDEX  # (N, T-1)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    tok = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # (N, T-1)
    return tok * valid, valid


def target_row_nll(logits: Tensor, rows: TokenRows) -> Tensor:
    """Mean per-token NLL of each row's target, ``(N,)`` (0 for a row without target)."""
    tok, valid = _token_logp(logits, rows)
    return -tok.sum(1) / valid.sum(1).clamp(min=1)  # (N,)


def target_accuracy(logits: Tensor, rows: TokenRows) -> Tensor:
    """Per row, the fraction of target tokens that are the argmax (teacher-forced), ``(N,)``."""
    target = rows.labels[:, 1:]  # (N, T-1)
    valid = target != IGNORE_INDEX
    hit = (logits[:, :-1].argmax(-1) == target) & valid  # (N, T-1)
    return hit.sum(1).float() / valid.sum(1).clamp(min=1)  # (N,)


def locality_kl(base_logits: Tensor, edited: Tensor, rows: TokenRows) -> Tensor:
    """``KL(p_θ ‖ p_θ̃)`` of the next-token distributions at the rows' ``predict_mask`` positions,
    averaged over those positions (a scalar)."""
    m = rows.predict_mask.bool()  # (N, T)
    if not bool(m.any()):
        raise ValueError("the locality rows mark no position to compare (predict_mask is empty)")
    logp = F.log_softmax(base_logits[m].float(), dim=-1)  # (P, V)
    logq = F.log_softmax(edited[m].float(), dim=-1)  # (P, V)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def locality_agreement(base_logits: Tensor, edited: Tensor, rows: TokenRows) -> Tensor:
    """The fraction of ``predict_mask`` positions whose argmax the edit leaves unchanged."""
    m = rows.predict_mask.bool()
    return (base_logits[m].argmax(-1) == edited[m].argmax(-1)).float().mean()


# ----------------------------------------------------------------------------------------------
# Gradient decomposition and the edited forward pass


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


def _group_by_case(x: Tensor, keep: Tensor, case_index: Tensor, n_cases: int,
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
    rows = _to_device(rows, device)
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
    keep = (rows.predict_mask.bool() & (rows.labels != IGNORE_INDEX).any(1, keepdim=True)
            if positions == "target" else rows.attention_mask.bool())  # (N, T)
    out: dict[str, TokenFactors] = {}
    for n, g in zip(names, grads):
        u = rec[n].input
        if u is None:
            raise RuntimeError(f"module {n!r} was not called in the forward pass")
        u_c, mask = _group_by_case(u.detach().float(), keep, idx, C)  # (C, K, d_in)
        d_c, _ = _group_by_case(g.detach().float(), keep, idx, C)  # (C, K, d_out)
        out[n] = TokenFactors(u_c, d_c, mask)
    return out


def edited_logits(model: nn.Module, rows: TokenRows, edits: Mapping[str, LowRankEdit],
                  case_index: Tensor | None = None) -> Tensor:
    """Logits ``(N, T, V)`` of the model with ``W̃ = W + ΔW_c`` in each edited module, row ``i``
    using the edit of its case ``case_index[i]``. The weights are not touched: each edited
    module's output becomes ``y + ΔW_c u = y + Σ_k left_k (right_kᵀ u)``, differentiable with
    respect to the edit factors."""
    device = model_device(model)
    rows = _to_device(rows, device)
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


# ----------------------------------------------------------------------------------------------
# The editor network


class RunningMoments(nn.Module):
    """Running per-coordinate mean and variance (merged exactly from batch sums, float64).

    ``normalize(x) = (x − mean) / (std + eps)`` (see :meth:`normalize`). The statistics are buffers (saved in checkpoints) and change only through
    :meth:`update_from_sums`.
    """

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @staticmethod
    def batch_sums(x: Tensor) -> Tensor:
        """``[n, Σx (d), Σx² (d)]`` of the rows of ``x`` ``(n, d)``, float64 ``(1 + 2d,)``: the
        sufficient statistics, which add up across batches and processes."""
        x = x.detach().double()  # (n, d)
        n = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        return torch.cat([n, x.sum(0), (x * x).sum(0)])

    @torch.no_grad()
    def update_from_sums(self, sums: Tensor) -> None:
        """Merge a batch's :meth:`batch_sums` into the running moments (Chan et al.)."""
        sums = sums.to(self.mean.device, torch.float64)
        n_b = sums[0]
        if float(n_b) <= 0:
            return
        mean_b = sums[1:1 + self.dim] / n_b  # (d,)
        m2_b = (sums[1 + self.dim:] - n_b * mean_b * mean_b).clamp(min=0)  # (d,)
        total = self.count + n_b
        diff = mean_b - self.mean  # (d,)
        self.mean += diff * n_b / total
        self.m2 += m2_b + diff * diff * self.count * n_b / total
        self.count.copy_(total)

    @property
    def std(self) -> Tensor:
        """The running standard deviation ``(d,)`` (unbiased)."""
        return (self.m2 / (self.count - 1).clamp(min=1)).sqrt()  # (d,)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x − mean) / (std + eps)``, with each coordinate's std floored at 1% of the mean std
        (so that a coordinate that happened to be constant in the few samples seen so far does
        not blow up); the identity until two samples with some spread have been seen."""
        if float(self.count) < 2:
            return x
        std = self.std
        floor = 1e-2 * std.mean()
        if not bool(floor > 0):
            return x
        mean = self.mean.to(x.dtype)
        return (x - mean) / (std.clamp(min=floor).to(x.dtype) + self.eps)


class MENDNet(nn.Module):
    """The editor network ``g`` for one weight shape: ``n_blocks`` residual low-rank blocks
    ``h ← h + s_ℓ ⊙ (U ReLU(V h + b)) + o_ℓ``, the identity at initialisation (``U = 0``,
    ``o = 0``), with the modulation ``(s_ℓ, o_ℓ)`` of the layer it serves.

    Args:
        dim: ``m = d_in + d_out``.
        rank: ``r``.
        n_blocks: the number of blocks.
        n_layers: how many layers share this network (one ``(s, o)`` each).
    """

    def __init__(self, dim: int, rank: int, n_blocks: int, n_layers: int) -> None:
        super().__init__()
        self.dim, self.rank, self.n_blocks = dim, rank, n_blocks
        V = torch.empty(n_blocks, rank, dim)
        for j in range(n_blocks):
            nn.init.xavier_uniform_(V[j])
        self.V = nn.Parameter(V)  # (n_blocks, r, m)
        self.U = nn.Parameter(torch.zeros(n_blocks, dim, rank))  # (n_blocks, m, r)
        self.b = nn.Parameter(torch.zeros(n_blocks, rank))  # (n_blocks, r)
        self.scale = nn.Parameter(torch.ones(n_blocks, n_layers, dim))  # s_ℓ
        self.shift = nn.Parameter(torch.zeros(n_blocks, n_layers, dim))  # o_ℓ

    def forward(self, z: Tensor, layer: int) -> Tensor:
        """``z`` ``(..., m)`` → ``g_ℓ(z)`` ``(..., m)``."""
        h = z
        for j in range(self.n_blocks):
            hidden = F.relu(h @ self.V[j].T + self.b[j])  # (..., r)
            h = h + self.scale[j, layer] * (hidden @ self.U[j].T) + self.shift[j, layer]
        return h


class MENDNetwork(nn.Module):
    """All of MEND's trainable state for one base model: the editor networks (shared by weight
    shape), the input normalisers and the step sizes ``α_ℓ`` of each edited weight.

    Args:
        shapes: ``{module name: (d_out, d_in)}`` of the edited linear modules, in order.
        hparams: the :class:`MENDHyperParams`.

    Use :meth:`for_model` to build one from a model.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], hparams: MENDHyperParams) -> None:
        super().__init__()
        self.hparams = hparams
        self.module_names = list(shapes)
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        self.alpha = nn.Parameter(torch.full((len(shapes),), float(hparams.edit_lr)))  # α_ℓ
        self.norm_u = nn.ModuleList(RunningMoments(d_in, hparams.norm_eps)
                                    for _, d_in in self.shapes.values())
        self.norm_delta = nn.ModuleList(RunningMoments(d_out, hparams.norm_eps)
                                        for d_out, _ in self.shapes.values())
        self._net_of: list[tuple[str, int]] = []  # (net key, modulation index) per layer
        groups: dict[str, int] = {}
        for i, (d_out, d_in) in enumerate(self.shapes.values()):
            key = f"shape_{d_out}x{d_in}" if hparams.share else f"layer_{i}"
            self._net_of.append((key, groups.get(key, 0)))
            groups[key] = groups.get(key, 0) + 1
        self.nets = nn.ModuleDict()
        for key, count in groups.items():
            i = next(j for j, (k, _) in enumerate(self._net_of) if k == key)
            d_out, d_in = list(self.shapes.values())[i]
            self.nets[key] = MENDNet(d_in + d_out, hparams.rank, hparams.n_blocks, count)

    @classmethod
    def for_model(cls, model: nn.Module, hparams: MENDHyperParams,
                  layout: ModelLayout | None = None) -> MENDNetwork:
        """The network for ``hparams.layers`` of ``model`` (``None``: its last three layers).

        Raises:
            IndexError: a layer does not exist.
        """
        layout = layout or get_layout(model)
        layers = resolve_layers(model, hparams.layers, layout)
        weights = edited_weights(model, layers, hparams.part, layout)
        return cls({m: s for m, s in weights.values()}, hparams)

    @property
    def param_names(self) -> list[str]:
        return [weight_param_name(n) for n in self.module_names]

    def stats_sums(self, factors: Mapping[str, TokenFactors]) -> Tensor:
        """The batch sums of every normaliser's inputs (real tokens only), one flat float64
        tensor: all-reduce it (sum) across processes before :meth:`update_stats`."""
        parts = []
        for n in self.module_names:
            f = factors[n]
            parts.append(RunningMoments.batch_sums(f.u[f.mask]))
            parts.append(RunningMoments.batch_sums(f.delta[f.mask]))
        return torch.cat(parts)

    def update_stats(self, sums: Tensor) -> None:
        """Merge :meth:`stats_sums` into the running statistics."""
        k = 0
        for i in range(len(self.module_names)):
            for norm in (self.norm_u[i], self.norm_delta[i]):
                size = 1 + 2 * norm.dim
                norm.update_from_sums(sums[k:k + size])
                k += size

    def forward(self, factors: Mapping[str, TokenFactors]) -> dict[str, LowRankEdit]:
        """``(u, δ)`` → per-case edits ``ΔW_c = −α_ℓ Σ_t δ̃_t ũ_tᵀ`` of every edited module."""
        out: dict[str, LowRankEdit] = {}
        for i, n in enumerate(self.module_names):
            f = factors[n]
            d_out, d_in = self.shapes[n]
            if f.u.shape[-1] != d_in or f.delta.shape[-1] != d_out:
                raise ValueError(f"factors of {n!r} have sizes {f.u.shape[-1]}, "
                                 f"{f.delta.shape[-1]}; the editor expects in={d_in}, "
                                 f"out={d_out}")
            z = torch.cat([self.norm_u[i].normalize(f.u),
                           self.norm_delta[i].normalize(f.delta)], dim=-1)  # (C, K, m)
            key, layer = self._net_of[i]
            g = self.nets[key](z, layer)  # (C, K, m)
            keep = f.mask[..., None].to(g.dtype)  # (C, K, 1)
            u_t = g[..., :d_in] * keep  # (C, K, d_in)   ũ
            d_t = g[..., d_in:] * keep  # (C, K, d_out)  δ̃
            out[n] = LowRankEdit(left=-self.alpha[i] * d_t, right=u_t)
        return out


# ----------------------------------------------------------------------------------------------
# Training losses


def check_training_batch(batch: Any, method: str) -> None:
    """Refuse what is not a training batch with edit, equivalence and locality rows."""
    for part in ("edit", "equiv", "loc"):
        if not hasattr(batch, part):
            raise TypeError(
                f"{method} trains on EditTrainingBatch (edit, equiv and loc rows), got "
                f"{type(batch).__name__}; use a DataModule with mode='edit_train' or "
                "lightning_rome.data.EditTrainingCollator as the collate_fn")
    if batch.loc is None or len(batch.loc) == 0:
        raise ValueError(f"{method} needs locality examples, but this batch has no locality rows "
                         "(batch.loc is empty): the locality loss cannot be computed; give the "
                         "cases neighborhood prompts or let the collator draw them from other "
                         "cases (locality='other' with a pool of several cases)")
    if len(batch.edit) == 0 or len(batch.equiv) == 0:
        raise ValueError(f"{method} needs edit and equivalence rows; this batch has "
                         f"{len(batch.edit)} and {len(batch.equiv)}")


StatsReduce = Callable[[Tensor], Tensor]


def mend_losses(model: nn.Module, network: MENDNetwork, batch: Any, *,
                update_stats: bool = False, reduce: StatsReduce | None = None,
                ) -> dict[str, Tensor]:
    """MEND's training objective on one :class:`~lightning_rome.data.EditTrainingBatch`.

    Every case is edited on its own (``ΔW_c`` from its edit row) and judged on its own
    equivalence and locality rows, all in batched passes: one forward/backward for the
    gradients, one plain forward for ``p_θ`` on the locality rows, and one edited forward each
    for the equivalence and locality rows.

    Args:
        model: the base model (frozen).
        network: the :class:`MENDNetwork`.
        batch: the training batch.
        update_stats: merge this batch's ``(u, δ)`` into the running normalisation statistics
            (training only).
        reduce: sums the statistics across processes (DDP) before they are merged.

    Returns:
        ``loss`` (``c_edit·L_e + c_loc·L_loc``, differentiable into the network), ``edit_nll``
        (``L_e``), ``loc_kl`` (``L_loc``), and for logging ``edit_acc`` (teacher-forced token
        accuracy of ``y_e`` after ``x_e'`` under the edited model) and ``loc_agree`` (the
        fraction of locality positions whose argmax the edit leaves unchanged).

    Raises:
        TypeError: the batch is not an ``EditTrainingBatch`` (e.g. ``mode="cases"``).
        ValueError: the batch has no locality rows.
    """
    hp = network.hparams
    check_training_batch(batch, "MEND")
    n_cases = len(batch.edit)
    factors = decompose_gradient(model, batch.edit, network.module_names,
                                 positions=hp.positions, n_cases=n_cases)
    if update_stats:
        sums = network.stats_sums(factors)
        network.update_stats(reduce(sums) if reduce is not None else sums)
    edits = network(factors)
    return _edit_objective(model, edits, batch, c_edit=hp.c_edit, c_loc=hp.c_loc,
                           edit_rows_too=False)


def _edit_objective(model: nn.Module, edits: Mapping[str, LowRankEdit], batch: Any, *,
                    c_edit: float, c_loc: float, edit_rows_too: bool) -> dict[str, Tensor]:
    """``c_edit · L_e + c_loc · L_loc`` and diagnostics, shared by MEND and KE. ``L_e`` is the
    mean over the equivalence rows (and the edit rows too with ``edit_rows_too``, KE's ``{x} ∪
    P^x``) of each row's mean per-token NLL of the new target."""
    with torch.inference_mode(False), torch.enable_grad():
        device = model_device(model)
        loc = _to_device(batch.loc, device)
        with torch.no_grad():
            base_loc = forward_logits(model, loc)  # (N_loc, T, V)  p_θ
        equiv_logits = edited_logits(model, batch.equiv, edits)  # (N_eq, T, V)
        equiv = _to_device(batch.equiv, device)
        nll = target_row_nll(equiv_logits, equiv)  # (N_eq,)
        acc = target_accuracy(equiv_logits.detach(), equiv)
        if edit_rows_too:
            ed = _to_device(batch.edit, device)
            edit_logits = edited_logits(model, ed, edits)
            nll = torch.cat([target_row_nll(edit_logits, ed), nll])
            acc = torch.cat([target_accuracy(edit_logits.detach(), ed), acc])
        loc_logits = edited_logits(model, loc, edits)  # (N_loc, T, V)  p_θ̃
        L_e = nll.mean()
        L_loc = locality_kl(base_loc, loc_logits, loc)
        loss = c_edit * L_e + c_loc * L_loc
    return {"loss": loss, "edit_nll": L_e, "loc_kl": L_loc, "edit_acc": acc.mean(),
            "loc_agree": locality_agreement(base_loc, loc_logits.detach(), loc)}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def read_editor_checkpoint(path: str | os.PathLike[str], method: str,
                           ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """The saved hyperparameters, the network's state dict and the editor metadata of a
    Lightning checkpoint written by ``MENDModule``/``KEModule``, read with
    ``torch.load(weights_only=True)`` (nothing is unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"editor checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lightning_rome hypernetwork-editor checkpoint (no "
                         f"{CHECKPOINT_KEY!r} entry)")
    if meta.get("method") != method:
        raise ValueError(f"{path} holds a {meta.get('method')!r} editor, not {method!r}")
    state = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("network.")}
    return dict(ckpt.get("hyper_parameters", {})), state, meta


def editor_metadata(model: nn.Module, network: nn.Module, method: str,
                    model_name: str | None) -> dict[str, Any]:
    """What a checkpoint records about the base model an editor was trained for."""
    names = [weight_param_name(n) for n in network.module_names]
    return {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "model_name": model_name,
        "module_names": list(network.module_names),
        "shapes": {p: list(network.shapes[m]) for p, m in zip(names, network.module_names)},
        "fingerprint": weights_fingerprint(model, names),
    }


def model_name_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


# ----------------------------------------------------------------------------------------------
# The editor


def _checked_requests(tokenizer: PreTrainedTokenizerBase, requests: Any,
                      method: str = "this editor") -> list[EditRequest]:
    reqs = check_batch(as_requests(requests), method)
    if not reqs:
        raise ValueError("no edit requests given")
    for r in reqs:
        subject_span(tokenizer, r.prompt, r.subject)  # SubjectNotFoundError names the request
    return reqs


class MENDEditor:
    """A trained MEND editor: ``edit(model, tokenizer, requests)`` returns a low-rank
    :class:`~lightning_rome.patches.WeightPatch` from one forward and one backward pass of the
    base model and one pass of the editor network; the model is left bit-identical.

    Several requests are edited together: their gradients add up (``Σ`` over all their target
    tokens), as in MEND's batched edits.

    Args:
        network: the trained :class:`MENDNetwork`.
        fingerprint: ``{parameter: checksum}`` of the weights it was trained on (a record;
            :meth:`from_checkpoint` checks it, while :meth:`edit` only checks that the edited
            weights exist with their shapes, so that edits can follow other edits).
        model_name: the base model it was trained on (for messages and patches).

    Example:
        >>> editor = MENDEditor.from_checkpoint("mend.ckpt", model)
        >>> patch = editor.edit(model, tok, EditRequest("{} plays the", "Arton Kalrin", "piano"))
        >>> patch.apply(model)
    """

    method = "mend"

    def __init__(self, network: MENDNetwork, *, fingerprint: Mapping[str, str] | None = None,
                 model_name: str | None = None) -> None:
        self.network = network
        self.fingerprint = dict(fingerprint) if fingerprint else None
        self.model_name = model_name

    @property
    def hparams(self) -> MENDHyperParams:
        return self.network.hparams

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], model: nn.Module,
                        tokenizer: PreTrainedTokenizerBase | None = None, *,
                        check_fingerprint: bool = True) -> MENDEditor:
        """Load the editor of a ``MENDModule`` checkpoint for ``model``.

        Raises:
            EditorMismatchError: the checkpoint was trained for another model (a missing
                weight, another shape, or a fingerprint mismatch).
        """
        saved, state, meta = read_editor_checkpoint(path, cls.method)
        hp = MENDHyperParams.from_dict(saved["hparams"])
        check_editor_fits(model, meta["shapes"], meta["fingerprint"] if check_fingerprint
                          else None, trained_on=meta.get("model_name"))
        shapes = {m: meta["shapes"][weight_param_name(m)] for m in meta["module_names"]}
        network = MENDNetwork(shapes, hp)
        network.load_state_dict(state)
        network.to(model_device(model)).eval()
        return cls(network, fingerprint=meta["fingerprint"] if check_fingerprint else None,
                   model_name=meta.get("model_name"))

    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
             ) -> WeightPatch:
        """The MEND update for ``requests`` as a :class:`WeightPatch` (rank = the number of
        target tokens, per edited weight); the model is not changed.

        Raises:
            EditorMismatchError: the model lacks an edited weight or has another shape.
            SubjectNotFoundError: a request's subject is not in its prompt's tokens.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        reqs = _checked_requests(tokenizer, requests, self.method)
        check_editor_fits(model, {weight_param_name(m): s for m, s in
                                  self.network.shapes.items()}, None, trained_on=self.model_name)
        rows = edit_rows(tokenizer, [r.text for r in reqs], [r.target_new for r in reqs],
                         case_index=[0] * len(reqs))
        factors = decompose_gradient(model, rows, self.network.module_names,
                                     positions=self.hparams.positions, n_cases=1)
        with eval_mode(self.network), torch.no_grad():
            edits = self.network(factors)
        keep = next(iter(factors.values())).mask[0]  # (K,) all real here
        return edits_to_patch(model, edits, method=self.method, hparams=self.hparams.to_dict(),
                              requests=reqs, drop_padding=keep)
