"""MEND as a LightningModule: train the editor networks with ``Trainer.fit`` on COUNTERFACT
(MEND-CF) or zsRE (MEND-zsRE) training batches, checkpoint them, and edit with them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.mend import (
    CHECKPOINT_KEY,
    MENDEditor,
    MENDHyperParams,
    MENDNetwork,
    check_editor_fits,
    editor_metadata,
    mend_losses,
    model_name_of,
    resolve_layers,
)
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.loading import load_tokenizer, resolve_model
from lightning_rome.patches import WeightPatch

__all__ = ["HypernetworkModule", "MENDModule"]

LayoutArg = ModelLayout | dict[str, Any] | str | None


def _layout_to_json(layout: LayoutArg) -> dict[str, Any] | str | None:
    """A JSON-able form of a layout override (a full layout becomes a dict of all its fields)."""
    if isinstance(layout, ModelLayout):
        d = dataclasses.asdict(layout)
        d["n_layers_attr"] = list(d["n_layers_attr"])
        return d
    return layout


def _layout_from_json(model: nn.Module, layout: LayoutArg) -> ModelLayout:
    if isinstance(layout, dict) and {f.name for f in dataclasses.fields(ModelLayout)} <= set(
            layout):
        return ModelLayout(**{**layout, "n_layers_attr": tuple(layout["n_layers_attr"])})
    return get_layout(model, layout)


class HypernetworkModule(pl.LightningModule):
    """What :class:`MENDModule` and :class:`~lightning_rome.modules.KEModule` share: the frozen
    base model kept *outside* the module tree (so it is neither trained, nor saved in
    checkpoints, nor wrapped by DDP), checkpoint metadata (the base model's name and the
    fingerprint of the edited weights) checked on load, and logging.

    The base model is put in eval mode (no dropout) and its parameters get
    ``requires_grad=False``; it follows the module to its device when fitting, validating or
    testing.
    """

    method = ""

    def _setup_base(self, model: nn.Module | str, tokenizer: PreTrainedTokenizerBase | str | None,
                    check_fingerprint: bool) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
        if isinstance(model, str | os.PathLike):  # a name or path, as YAML configs give it
            model, tokenizer = resolve_model(model, tokenizer)
        elif isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Not a submodule: object.__setattr__ bypasses nn.Module's registration.
        object.__setattr__(self, "model", model)
        self.tokenizer = tokenizer
        self.check_fingerprint = check_fingerprint
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tokenizer

    # -------------------------------------------------------------------------- device
    def _base_to_device(self) -> None:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != self.device:
            self.model.to(self.device)

    @override
    def on_fit_start(self) -> None:
        self._base_to_device()

    @override
    def on_validation_start(self) -> None:
        self._base_to_device()

    @override
    def on_test_start(self) -> None:
        self._base_to_device()

    # -------------------------------------------------------------------------- checkpoints
    def editor_metadata(self) -> dict[str, Any]:
        """The ``lightning_rome_editor`` entry of this module's checkpoints."""
        return editor_metadata(self.model, self.network, self.method,
                               self.hparams.get("model_name"))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.editor_metadata()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(meta, Mapping) or meta.get("method") != self.method:
            raise ValueError(f"this checkpoint holds no {self.method!r} editor (its "
                             f"{CHECKPOINT_KEY!r} entry is missing or for another method)")
        check_editor_fits(self.model, meta["shapes"],
                          meta["fingerprint"] if self.check_fingerprint else None,
                          trained_on=meta.get("model_name"))

    # -------------------------------------------------------------------------- logging
    def _log_losses(self, stage: str, out: Mapping[str, Tensor], batch_size: int) -> None:
        train = stage == "train"
        for key, value in out.items():
            self.log(f"{stage}/{key}", value.detach() if isinstance(value, Tensor) else value,
                     prog_bar=key in ("loss", "edit_acc"), on_step=train, on_epoch=not train,
                     batch_size=batch_size, sync_dist=not train)

    def _reduce_sum(self, t: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="sum")

    def _reduce_mean(self, t: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="mean")

    def edit(self, requests: Any) -> WeightPatch:
        """Edit the base model with the editor as trained so far (see :meth:`editor`)."""
        if self.tokenizer is None:
            raise ValueError("edit() needs the tokenizer: pass tokenizer= to the module")
        self._base_to_device()
        return self.editor().edit(self.model, self.tokenizer, requests)


class MENDModule(HypernetworkModule):
    """Train MEND's editor networks with ``Trainer.fit`` (MEND-CF, MEND-zsRE).

    Every training batch is an :class:`~lightning_rome.data.EditTrainingBatch` (a
    :class:`~lightning_rome.data.CounterFactDataModule` or
    :class:`~lightning_rome.data.ZsREDataModule` with ``mode="edit_train"``). ``training_step``
    computes :func:`~lightning_rome.editing.mend.mend_losses`: each case's gradient is
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
        model: the base causal LM (frozen; not part of the module's state), or its name or
            local path (loaded with :func:`~lightning_rome.models.load_model`, as YAML configs
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
        layout_obj = _layout_from_json(model, layout)
        hp = dataclasses.replace(hp, layers=resolve_layers(model, hp.layers, layout_obj))
        self.mend_hparams = hp
        self.network = MENDNetwork.for_model(model, hp, layout_obj)
        self.save_hyperparameters({"hparams": hp.to_dict(), "layout": _layout_to_json(layout),
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

    def editor(self) -> MENDEditor:
        """A :class:`~lightning_rome.editing.MENDEditor` sharing this module's network (edits
        run in eval mode: no statistics update)."""
        meta = self.editor_metadata()
        return MENDEditor(self.network, fingerprint=meta["fingerprint"],
                          model_name=meta["model_name"])
