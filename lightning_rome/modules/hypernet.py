"""What the hypernetwork LightningModules (:class:`~lightning_rome.modules.MENDModule`,
:class:`~lightning_rome.modules.KEModule`) share: the base model as a frozen submodule in eval
mode, checkpoints without its weights, the editor entry checked on load, and logging."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.hypernet.checkpoint import CHECKPOINT_KEY, editor_metadata
from lightning_rome.editing.hypernet.weights import check_editor_fits
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.loading import load_tokenizer, resolve_model
from lightning_rome.modules._frozen import EvalModeModel
from lightning_rome.patches import WeightPatch

__all__ = ["HypernetworkModule", "LayoutArg", "layout_from_json", "layout_to_json"]

LayoutArg = ModelLayout | dict[str, Any] | str | None


def layout_to_json(layout: LayoutArg) -> dict[str, Any] | str | None:
    """A JSON-able form of a layout override (a full layout becomes a dict of all its fields)."""
    if isinstance(layout, ModelLayout):
        d = dataclasses.asdict(layout)
        d["n_layers_attr"] = list(d["n_layers_attr"])
        return d
    return layout


def layout_from_json(model: nn.Module, layout: LayoutArg) -> ModelLayout:
    if isinstance(layout, dict) and {f.name for f in dataclasses.fields(ModelLayout)} <= set(
            layout):
        return ModelLayout(**{**layout, "n_layers_attr": tuple(layout["n_layers_attr"])})
    return get_layout(model, layout)


class HypernetworkModule(EvalModeModel, pl.LightningModule):
    """What :class:`MENDModule` and :class:`~lightning_rome.modules.KEModule` share: the frozen
    base model as a submodule, checkpoints that hold the editor but not the base model, the
    checkpoint metadata (the base model's name and the fingerprint of the edited weights) checked
    on load, and logging.

    The base model is the submodule ``model``: ``.to()``, the Trainer's device placement,
    precision plugins (``precision="bf16-true"``) and ``ModelSummary`` (as non-trainable
    parameters) see it. Its parameters get ``requires_grad=False``. It runs in eval mode (no
    dropout) while the editor trains: :meth:`train` leaves it alone, ``Trainer.fit`` puts it in
    eval mode and gives every submodule its own mode back when the fit ends or fails
    (:class:`~lightning_rome.modules._frozen.EvalModeModel`), and the editors run it in eval
    mode. Its weights are left out of checkpoints (:meth:`on_save_checkpoint`), and
    :meth:`load_state_dict` accepts a state dict without them, checking the editor's own keys
    strictly.
    """

    method = ""
    #: The name of the base-model submodule, and so the prefix of its keys in the state dict.
    BASE = "model"

    def _setup_base(self, model: nn.Module | str, tokenizer: PreTrainedTokenizerBase | str | None,
                    check_fingerprint: bool) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
        if isinstance(model, str | os.PathLike):  # a name or path, as YAML configs give it
            model, tokenizer = resolve_model(model, tokenizer)
        elif isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.check_fingerprint = check_fingerprint
        return model, tokenizer

    # -------------------------------------------------------------------------- modes
    @override
    def train(self, mode: bool = True) -> HypernetworkModule:
        """Set the editor's mode; the base model stays in eval mode (it is never trained)."""
        super().train(mode)
        self.model.eval()
        return self

    # -------------------------------------------------------------------------- checkpoints
    def editor_metadata(self) -> dict[str, Any]:
        """The ``lightning_rome_editor`` entry of this module's checkpoints."""
        return editor_metadata(self.model, self.network, self.method,
                               self.hparams.get("model_name"))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the editor metadata and drop the base model's weights from the checkpoint."""
        prefix = f"{self.BASE}."
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
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

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """Load the editor's state; the base model's keys may be absent (checkpoints leave them
        out), every other key is checked as ``strict`` says.

        Raises:
            RuntimeError: with ``strict``, an editor key is missing or a key is unexpected.
        """
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        prefix = f"{self.BASE}."
        missing = [k for k in keys.missing_keys if not k.startswith(prefix)]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                f"{missing}, unexpected keys {list(keys.unexpected_keys)} (the base model's keys "
                f"{prefix}* may be missing; the editor's may not)")
        return type(keys)(missing, list(keys.unexpected_keys))

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
        return self.editor().edit(self.model, self.tokenizer, requests)
