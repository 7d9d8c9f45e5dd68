"""MEND as a LightningModule: train the editor networks with ``Trainer.fit`` on COUNTERFACT
(MEND-CF) or zsRE (MEND-zsRE) training batches, checkpoint them, and edit with them."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.hypernet.checkpoint import model_name_of
from lightning_rome.editing.hypernet.mend import MEND, MENDHyperParams, MENDNetwork, mend_losses
from lightning_rome.editing.hypernet.weights import resolve_layers
from lightning_rome.modules.hypernet import (
    HypernetworkModule,
    LayoutArg,
    layout_from_json,
    layout_to_json,
)

__all__ = ["MENDModule"]


class MENDModule(HypernetworkModule):
    """Train MEND's editor networks with ``Trainer.fit`` (MEND-CF, MEND-zsRE).

    Every training batch is an :class:`~lightning_rome.data.EditTrainingBatch` (a
    :class:`~lightning_rome.data.CounterFactDataModule` or
    :class:`~lightning_rome.data.ZsREDataModule` with ``mode="edit_train"``). ``training_step``
    computes :func:`~lightning_rome.editing.hypernet.mend_losses`: each case's gradient is
    decomposed into ``(u, δ)``, transformed by the editor into ``ΔW_c = −α Σ δ̃ ũᵀ``, and the
    loss ``c_edit · L_e + c_loc · L_loc`` is backpropagated through the edited forward pass into
    the editor (the base model's weights stay frozen and bit-identical). The running
    normalisation statistics are summed across processes under DDP.

    Logged: ``train/loss``, ``train/edit_nll`` (``L_e``), ``train/loc_kl`` (``L_loc``),
    ``train/edit_acc`` (token accuracy of the new target on the equivalence prompts after the
    edit), ``train/loc_agree`` (argmax agreement on locality prompts); the same under ``val/``.

    Checkpoints hold the editor only (not the base model), its hyperparameters
    (``save_hyperparameters``: ``hparams``, ``layout``, ``model_name``) and the fingerprint of the
    edited weights, which :meth:`load_from_checkpoint` checks against the model it is given.

    Args:
        model: the base causal LM (a frozen submodule, left out of checkpoints), or its name
            or local path (loaded with :func:`~lightning_rome.models.load_model`, as YAML configs
            give it).
        tokenizer: its tokenizer or its path (needed for :meth:`edit` only; default: the
            model's, when ``model`` is a name or path).
        hparams: :class:`~lightning_rome.editing.MENDHyperParams`, a dict, a preset name or a
            YAML path; ``layers=None`` resolves to the model's last three layers.
        layout: a layout override (see :func:`lightning_rome.models.get_layout`).
        model_name: the base model's name or path, recorded in checkpoints (default: the
            model config's ``_name_or_path``).
        check_fingerprint: when loading a checkpoint, require the edited weights to be
            bit-identical to those the editor was trained on.

    Raises:
        IndexError: a layer in ``hparams.layers`` does not exist.

    Example:
        >>> module = MENDModule(model, tok, {"rank": 64, "lr": 1e-4})
        >>> dm = CounterFactDataModule("counterfact/counterfact-train.json", mode="edit_train",
        ...                            tokenizer=tok, train_split="0:10000", batch_size=8)
        >>> L.Trainer(max_steps=1000).fit(module, datamodule=dm)
        >>> module = MENDModule.load_from_checkpoint(path, model=model, tokenizer=tok)
        >>> patch = module.edit(EditRequest("{} plays the", "Toko Yasuda", "piano"))
    """

    method = "mend"

    def __init__(self, model: nn.Module | str,
                 tokenizer: PreTrainedTokenizerBase | str | None = None,
                 hparams: MENDHyperParams | dict[str, Any] | str | None = None, *,
                 layout: LayoutArg = None, model_name: str | None = None,
                 check_fingerprint: bool = True) -> None:
        super().__init__()
        model, tokenizer = self._setup_base(model, tokenizer, check_fingerprint)
        hp = MENDHyperParams.resolve(hparams)
        layout_obj = layout_from_json(model, layout)
        hp = dataclasses.replace(hp, layers=resolve_layers(model, hp.layers, layout_obj))
        self.mend_hparams = hp
        self.network = MENDNetwork.for_model(model, hp, layout_obj)
        self.save_hyperparameters({"hparams": hp.to_dict(), "layout": layout_to_json(layout),
                                   "model_name": model_name or model_name_of(model)})

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = mend_losses(self.model, self.network, batch, update_stats=True,
                          reduce=self._reduce_sum)
        self._log_losses("train", out, len(batch.edit))
        return out["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = mend_losses(self.model, self.network, batch)
        self._log_losses("val", out, len(batch.edit))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.mend_hparams
        rest = [p for n, p in self.network.named_parameters() if n != "alpha"]
        return torch.optim.Adam([{"params": rest, "lr": hp.lr},
                                 {"params": [self.network.alpha], "lr": hp.lr_alpha}])

    def editor(self) -> MEND:
        """A :class:`~lightning_rome.editing.MEND` sharing this module's network (edits
        run in eval mode: no statistics update)."""
        meta = self.editor_metadata()
        return MEND(self.network, fingerprint=meta["fingerprint"],
                          model_name=meta["model_name"])
