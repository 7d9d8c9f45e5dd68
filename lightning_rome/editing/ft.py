"""Fine-tuning baselines: FT and FT+L (constrained fine-tuning, Zhu et al. 2020).

Both minimise ``−log P[o* | p]`` (mean over the target's tokens) with Adam on the MLP output
weights of chosen layers. FT+L clamps every weight into ``±ε`` of its original value after each
optimiser step (L∞). The step code (:func:`ft_loss`, :meth:`FTState.step`) is shared by the
direct loop here, which the evaluator uses (no Trainer inside a Trainer, one edit per case in
milliseconds of overhead), and by :class:`lightning_rome.modules.FTModule`, which runs the same
steps through ``Trainer.fit`` with its logging.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.hparams import NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.models.checks import check_requests
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import in_eval_mode
from lightning_rome.models.precision import check_tuning_changed
from lightning_rome.models.weights import canonical_weight, is_transposed, weight_param_name
from lightning_rome.patches import WeightPatch
from lightning_rome.requests import EditRequest, as_requests, check_batch
from lightning_rome.scoring import target_nll
from lightning_rome.tokens import subject_span
from lightning_rome.utils.modules import unwrap_model

__all__ = ["FT", "FTL", "FTHyperParams", "FTState", "ft_loss"]


@dataclasses.dataclass
class FTHyperParams(HyperParams):
    """Fine-tuning hyperparameters (published defaults: lr 5e-4, at most 25 steps, early stop at
    loss < 0.03; FT+L adds ``norm_constraint`` ε = 5e-4).

    Attributes:
        layers: layers whose ``part`` weight is tuned.
        part: the layout part tuned (``mlp_out`` by default).
        lr: Adam learning rate.
        num_steps: at most this many optimiser steps.
        early_stop_loss: stop once the mean NLL is below this.
        norm_constraint: ε of FT+L's L∞ ball (``None``: unconstrained FT).
        weight_decay: Adam weight decay.
    """

    METHOD = "ft"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layers": Num(integer=True, depth=1), "lr": POSITIVE, "num_steps": POSITIVE_INT,
        "early_stop_loss": NONNEG, "norm_constraint": Num(low=0, low_open=True, optional=True),
        "weight_decay": NONNEG,
    }

    layers: list[int] = dataclasses.field(default_factory=lambda: [1])
    part: str = "mlp_out"
    lr: float = 5e-4
    num_steps: int = 25
    early_stop_loss: float = 0.03
    norm_constraint: float | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers:
            raise ValueError("FT needs at least one layer")


class FTLHyperParams(FTHyperParams):
    """FT+L presets live in ``ft-l.yaml``."""

    METHOD = "ft-l"


def ft_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
            requests: Sequence[EditRequest]) -> Tensor:
    """``mean_i −log P[o*_i | p_i]`` (each a mean over the target's tokens), differentiable."""
    return target_nll(model, tokenizer, [r.text for r in requests],
                      [r.target_new for r in requests]).mean()


class FTState:
    """The tuned parameters of one fine-tuning edit: their originals, the constraint, and the
    optimiser step shared by the direct loop and the LightningModule."""

    def __init__(self, model: nn.Module, hparams: FTHyperParams,
                 layout: ModelLayout | None = None) -> None:
        layout = layout or get_layout(model)
        self.hparams = hparams
        self.names: list[str] = []
        for layer in hparams.layers:
            layout.check_layer(model, layer)
            self.names.append(weight_param_name(layout.name(hparams.part, layer)))
        self.params = [model.get_parameter(n) for n in self.names]
        self.originals = [p.detach().clone() for p in self.params]
        self.modules = [model.get_submodule(n.rpartition(".")[0]) for n in self.names]

    @torch.no_grad()
    def project(self) -> None:
        """FT+L: clamp each tuned weight into ``[W₀ − ε, W₀ + ε]``."""
        eps = self.hparams.norm_constraint
        if eps is None:
            return
        for p, p0 in zip(self.params, self.originals):
            p.copy_(torch.maximum(torch.minimum(p, p0 + eps), p0 - eps))

    @torch.no_grad()
    def restore(self) -> None:
        for p, p0 in zip(self.params, self.originals):
            p.copy_(p0)

    def deltas(self) -> dict[str, Tensor]:
        """Canonical ``[out, in]`` deltas, tuned minus original, float32."""
        out = {}
        for n, m, p0 in zip(self.names, self.modules, self.originals):
            w = canonical_weight(m).detach().float()
            w0 = (p0.T if _transposed(m) else p0).float()  # (out, in)
            out[n] = w - w0
        return out


def _transposed(module: nn.Module) -> bool:
    return is_transposed(module)


class FT:
    """Fine-tuning editor (direct loop). ``FT(norm_constraint=...)`` or :class:`FTL` is FT+L.

    Args:
        hparams: :class:`FTHyperParams`, a dict, a preset name (``"gpt2-xl"``) or a YAML path.
        layout: a layout override.
    """

    hparams_class: type[FTHyperParams] = FTHyperParams
    method = "ft"

    def __init__(self, hparams: FTHyperParams | dict[str, Any] | str | None = None, *,
                 layout: ModelLayout | dict[str, Any] | str | None = None) -> None:
        self.hparams = self.hparams_class.resolve(hparams)
        self.layout_override = layout
        self.last_losses: list[float] = []

    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
             ) -> WeightPatch:
        """Fine-tune on the requests and return the weight change as a dense patch; the model
        ends exactly as it started.

        Raises:
            FloatingPointError: the loss became NaN/inf (the model is restored first).
            TypeError: the tuned weights are float16.
            UnderflowError: the tuned bfloat16 weights did not move (the steps rounded away;
                the model is restored first).
            IncompatibleInputError: a request does not fit the model (vocabulary, length).
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        reqs = check_batch(as_requests(requests), self.method)
        for r in reqs:
            subject_span(tokenizer, r.prompt, r.subject)
        check_requests(model, tokenizer, reqs)
        state = FTState(model, hp, get_layout(model, self.layout_override))
        if any(p.dtype == torch.float16 for p in state.params):
            # Adam's second moment underflows in float16 (eps = 1e-8 rounds to 0): 0/0 = NaN.
            raise TypeError(f"{self.method}: cannot fine-tune float16 weights in place (Adam's "
                            "state underflows); load the model in float32 or bfloat16")
        checksums_from = WeightPatch.from_model(model, {n: torch.zeros(0) for n in state.names})
        trainable = {id(p) for p in state.params}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
        was_grad = [p.requires_grad for p in state.params]
        for p in frozen:
            p.requires_grad_(False)
        for p in state.params:
            p.requires_grad_(True)
        self.last_losses = []
        stepped = False
        try:
            with torch.enable_grad(), torch.inference_mode(False):
                opt = torch.optim.Adam(state.params, lr=hp.lr, weight_decay=hp.weight_decay)
                for _ in range(hp.num_steps):
                    loss = ft_loss(model, tokenizer, reqs)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"{self.method}: the loss became {value}; the model is restored")
                    self.last_losses.append(value)
                    if value < hp.early_stop_loss:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    stepped = True
                    state.project()
            deltas = state.deltas()
            if stepped:  # steps that all rounded away in bf16 would leave a patch of zeros
                check_tuning_changed(deltas, {n: p.dtype for n, p in zip(state.names,
                                                                         state.params)},
                                     self.method)
        finally:
            state.restore()
            for p in frozen:
                p.requires_grad_(True)
            for p, g in zip(state.params, was_grad):
                p.requires_grad_(g)
        return WeightPatch(deltas, method=self.method, hparams=hp.to_dict(), requests=reqs,
                           model_name=checksums_from.model_name,
                           checksums=checksums_from.checksums)


class FTL(FT):
    """FT+L: fine-tuning constrained to an L∞ ball of radius ``norm_constraint`` (default 5e-4,
    layer 0, as for GPT-2 XL in the ROME paper)."""

    hparams_class = FTLHyperParams
    method = "ft-l"

    def __init__(self, hparams: FTHyperParams | dict[str, Any] | str | None = None,
                 **kwargs: Any) -> None:
        if hparams is None:
            hparams = {"layers": [0], "norm_constraint": 5e-4}
        super().__init__(hparams, **kwargs)
        if self.hparams.norm_constraint is None:
            self.hparams.norm_constraint = 5e-4
