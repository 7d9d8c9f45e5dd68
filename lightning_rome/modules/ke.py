"""KnowledgeEditor (KE) as a LightningModule: train the hypernetwork with ``Trainer.fit`` on
COUNTERFACT (KE-CF) or zsRE (KE-zsRE) training batches under KE's constrained objective."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.hypernet.checkpoint import model_name_of
from lightning_rome.editing.hypernet.ke import KE, KEHyperParams, KENetwork, ke_losses, ke_margin
from lightning_rome.editing.hypernet.weights import resolve_layers
from lightning_rome.modules.hypernet import (
    HypernetworkModule,
    LayoutArg,
    layout_from_json,
    layout_to_json,
)

__all__ = ["KEModule"]


class KEModule(HypernetworkModule):
    """Train KnowledgeEditor with ``Trainer.fit`` (KE-CF, KE-zsRE).

    ``training_step`` computes :func:`~lightning_rome.editing.hypernet.ke.ke_losses` on an
    :class:`~lightning_rome.data.EditTrainingBatch`: the Lagrangian ``L_e + λ (C − m)`` with
    ``L_e`` the NLL of the new target on the edit and equivalence prompts under the edited model
    and ``C`` the locality KL; the optimiser minimises it over the editor while ``λ`` (a buffer,
    saved in checkpoints) takes a projected ascent step ``λ ← max(0, λ + lr_lambda (C − m))``
    after each batch, with ``C`` averaged over processes under DDP. The margin ``m`` follows
    :func:`~lightning_rome.editing.hypernet.ke.ke_margin` (optionally annealed). See
    :mod:`lightning_rome.editing.hypernet.ke` for the exact formulation.

    Logged: ``train/loss``, ``train/edit_nll``, ``train/loc_kl`` (``C``), ``train/constraint``
    (``C − m``), ``train/edit_acc``, ``train/loc_agree``, ``train/lambda``, ``train/margin``.

    Args:
        model: the base causal LM (a frozen submodule, left out of checkpoints), or its name
            or local path (as YAML configs give it).
        tokenizer: its tokenizer or its path (KE encodes the edit's text; default: the
            model's, when ``model`` is a name or path).
        hparams: :class:`~lightning_rome.editing.KEHyperParams`, a dict, a preset or a YAML path.
        layout, model_name, check_fingerprint: as for :class:`MENDModule`.

    Raises:
        IndexError: a layer in ``hparams.layers`` does not exist.
    """

    method = "ke"

    def __init__(self, model: nn.Module | str,
                 tokenizer: PreTrainedTokenizerBase | str | None = None,
                 hparams: KEHyperParams | dict[str, Any] | str | None = None, *,
                 layout: LayoutArg = None, model_name: str | None = None,
                 check_fingerprint: bool = True) -> None:
        super().__init__()
        model, tokenizer = self._setup_base(model, tokenizer, check_fingerprint)
        if tokenizer is None:
            raise ValueError("KE needs the tokenizer: it encodes the text of every edit")
        hp = KEHyperParams.resolve(hparams)
        layout_obj = layout_from_json(model, layout)
        hp = dataclasses.replace(hp, layers=resolve_layers(model, hp.layers, layout_obj))
        self.ke_hparams = hp
        self.network = KENetwork.for_model(model, hp, tokenizer, layout_obj)
        self.register_buffer("lam", torch.tensor(float(hp.lambda_init)))  # λ
        self.save_hyperparameters({"hparams": hp.to_dict(), "layout": layout_to_json(layout),
                                   "model_name": model_name or model_name_of(model)})

    @override
    def editor_metadata(self) -> dict[str, Any]:
        meta = super().editor_metadata()
        meta["input_dim"] = self.network.input_dim
        meta["vocab_size"] = self.network.vocab_size
        return meta

    @property
    def margin(self) -> float:
        """The KL margin ``m`` at the current step."""
        return ke_margin(self.ke_hparams, self.global_step)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        margin = self.margin
        out = ke_losses(self.model, self.network, self.tokenizer, batch, lam=float(self.lam),
                        margin=margin)
        out["lambda"] = self.lam.detach().clone()
        out["margin"] = torch.tensor(margin)
        self._log_losses("train", out, len(batch.edit))
        # Dual ascent on λ (after the loss used the current λ).
        c = self._reduce_mean(out["constraint"].to(self.lam.device, self.lam.dtype))
        with torch.no_grad():
            self.lam.copy_((self.lam + self.ke_hparams.lr_lambda * c).clamp(min=0.0))
        return out["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = ke_losses(self.model, self.network, self.tokenizer, batch, lam=float(self.lam),
                        margin=self.margin)
        self._log_losses("val", out, len(batch.edit))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=self.ke_hparams.lr)

    def editor(self) -> KE:
        """A :class:`~lightning_rome.editing.KE` sharing this module's network."""
        meta = self.editor_metadata()
        return KE(self.network, fingerprint=meta["fingerprint"],
                        model_name=meta["model_name"])
