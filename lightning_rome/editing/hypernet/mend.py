"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

MEND edits chosen weight matrices ``W_ℓ`` (by default ``W_out`` of the last three MLPs) with a
small trained network that transforms the fine-tuning gradient of the edit into a weight update.

**Gradient decomposition.** For a linear layer ``y = W u`` (canonical ``[out, in]``), the gradient
of a loss ``L`` is a sum of rank-one terms over the tokens ``t``::

    ∇_W L = Σ_t δ_t u_tᵀ,      δ_t = ∂L/∂y_t,  u_t the layer input at token t.

:func:`~lightning_rome.editing.hypernet.gradients.decompose_gradient` collects ``(u_t, δ_t)`` of every
edited layer in **one forward and one
backward pass** of the edit example ``x_e ‖ y_e`` (``L`` = the mean per-token NLL of ``y_e``, summed
over edit rows). By default (``positions="target"``) it keeps the tokens whose logits predict a
target token; ``positions="all"`` keeps every real token, and then ``Σ_t δ_t u_tᵀ`` *is* the exact
gradient.

**Editor network** (:class:`LowRankMLP`, the paper's §3.1). The inputs are normalised to zero mean
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
:func:`~lightning_rome.editing.hypernet.gradients.edited_logits` adds ``ΔW u`` to the output of each edited layer through
:func:`lightning_rome.hooks.module_hooks`, a differentiable function of the editor's parameters;
the base model's weights are never written. Each case of a batch is edited independently (its own
``ΔW_c`` applied to its own rows) within one batched forward pass.

The paper's settings for GPT-style models are the presets in ``presets/mend.yaml``: rank 1920,
``edit_lr`` (initial α) 1e-4, Adam with lr 1e-6 for the network and 1e-4 for α.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.hparams import NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.editing.hypernet.editor import HypernetEditor
from lightning_rome.editing.hypernet.gradients import (
    LowRankEdit,
    TokenFactors,
    decompose_gradient,
    edits_to_patch,
)
from lightning_rome.editing.hypernet.objective import check_training_batch, edit_objective
from lightning_rome.editing.hypernet.rows import edit_rows
from lightning_rome.editing.hypernet.weights import edited_shapes
from lightning_rome.models.layout import ModelLayout
from lightning_rome.models.modes import eval_mode
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import WeightPatch
from lightning_rome.requests import EditRequest

__all__ = ["MEND", "LowRankMLP", "MENDHyperParams", "MENDNetwork", "RunningMoments",
           "mend_losses"]


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


class RunningMoments(nn.Module):
    """Running per-coordinate mean and variance (merged exactly from batch sums, float64).

    ``normalize(x) = (x − mean) / (std + eps)`` (see :meth:`normalize`). The statistics change
    only through :meth:`update_from_sums`. They are the module's extra state (saved in
    ``state_dict`` and checkpoints under ``<prefix>_extra_state``), not buffers, so that a
    conversion of the whole module (``.to(torch.bfloat16)``, ``precision="bf16-true"``) leaves
    them in float64 (a count of 257 samples is not representable in bfloat16). They follow the
    device of the sums merged into them.
    """

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.count = torch.zeros((), dtype=torch.float64)  # n
        self.mean = torch.zeros(dim, dtype=torch.float64)  # (d,)
        self.m2 = torch.zeros(dim, dtype=torch.float64)  # (d,) Σ (x − mean)²

    @override
    def get_extra_state(self) -> Tensor:
        """``[n, mean (d), m2 (d)]``, float64 ``(1 + 2d,)``."""
        return torch.cat([self.count.reshape(1), self.mean, self.m2])

    @override
    def set_extra_state(self, state: Any) -> None:
        state = torch.as_tensor(state)
        if tuple(state.shape) != (1 + 2 * self.dim,):
            raise ValueError(f"RunningMoments of size {self.dim} needs statistics of shape "
                             f"({1 + 2 * self.dim},) = [n, mean, m2], got {tuple(state.shape)}")
        state = state.to(torch.float64)
        self.count = state[0].clone()
        self.mean = state[1:1 + self.dim].clone()
        self.m2 = state[1 + self.dim:].clone()

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
        sums = sums.detach().to(torch.float64)  # (1 + 2d,)
        if self.mean.device != sums.device:
            self.count, self.mean, self.m2 = (s.to(sums.device)
                                              for s in (self.count, self.mean, self.m2))
        n_b = sums[0]
        if float(n_b) <= 0:
            return
        mean_b = sums[1:1 + self.dim] / n_b  # (d,)
        m2_b = (sums[1 + self.dim:] - n_b * mean_b * mean_b).clamp(min=0)  # (d,)
        total = self.count + n_b
        diff = mean_b - self.mean  # (d,)
        self.mean = self.mean + diff * n_b / total
        self.m2 = self.m2 + m2_b + diff * diff * self.count * n_b / total
        self.count = total

    @property
    def std(self) -> Tensor:
        """The running standard deviation ``(d,)`` (unbiased), float64."""
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
        mean = self.mean.to(x.device, x.dtype)
        return (x - mean) / (std.clamp(min=floor).to(x.device, x.dtype) + self.eps)


class LowRankMLP(nn.Module):
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
            self.nets[key] = LowRankMLP(d_in + d_out, hparams.rank, hparams.n_blocks, count)

    @classmethod
    def for_model(cls, model: nn.Module, hparams: MENDHyperParams,
                  layout: ModelLayout | None = None) -> MENDNetwork:
        """The network for ``hparams.layers`` of ``model`` (``None``: its last three layers).

        Raises:
            IndexError: a layer does not exist.
        """
        return cls(edited_shapes(model, hparams.layers, hparams.part, layout), hparams)

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
            z = z.to(self.alpha.dtype)  # the network's precision (bf16-true: bfloat16)
            key, layer = self._net_of[i]
            g = self.nets[key](z, layer)  # (C, K, m)
            keep = f.mask[..., None].to(g.dtype)  # (C, K, 1)
            u_t = g[..., :d_in] * keep  # (C, K, d_in)   ũ
            d_t = g[..., d_in:] * keep  # (C, K, d_out)  δ̃
            out[n] = LowRankEdit(left=-self.alpha[i] * d_t, right=u_t)
        return out


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
    return edit_objective(model, edits, batch, c_edit=hp.c_edit, c_loc=hp.c_loc,
                           edit_rows_too=False)


class MEND(HypernetEditor):
    """A trained MEND editor: ``edit(model, tokenizer, requests)`` returns a low-rank
    :class:`~lightning_rome.patches.WeightPatch` from one forward and one backward pass of the
    base model and one pass of the editor network; the model is left bit-identical.

    Several requests are edited together: their gradients add up (``Σ`` over all their target
    tokens), as in MEND's batched edits.

    Args:
        network: the trained :class:`MENDNetwork`.
        fingerprint, model_name: see :class:`~lightning_rome.editing.hypernet.editor.HypernetEditor`.

    Example:
        >>> editor = MEND.from_checkpoint("mend.ckpt", model)
        >>> patch = editor.edit(model, tok, EditRequest("{} plays the", "Arton Kalrin", "piano"))
        >>> patch.apply(model)
    """

    method = "mend"
    hparams_class = MENDHyperParams
    network: MENDNetwork

    @classmethod
    @override
    def build_network(cls, shapes: Mapping[str, Sequence[int]], hparams: Any,
                      meta: Mapping[str, Any]) -> MENDNetwork:
        return MENDNetwork(shapes, hparams)

    @override
    def patch_for(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  requests: list[EditRequest]) -> WeightPatch:
        """One low-rank delta per edited weight, of rank = the number of target tokens (the
        requests' gradients add up)."""
        reqs = requests
        rows = edit_rows(tokenizer, [r.text for r in reqs], [r.target_new for r in reqs],
                         case_index=[0] * len(reqs))
        factors = decompose_gradient(model, rows, self.network.module_names,
                                     positions=self.hparams.positions, n_cases=1)
        with eval_mode(self.network), torch.no_grad():
            edits = self.network(factors)
        keep = next(iter(factors.values())).mask[0]  # (K,) all real here
        return edits_to_patch(model, edits, method=self.method, hparams=self.hparams.to_dict(),
                              requests=reqs, drop_padding=keep)
