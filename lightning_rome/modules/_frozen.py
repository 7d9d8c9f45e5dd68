"""Trainable editors run the edited model in eval mode during ``Trainer.fit``, on purpose.

FT, FT+L, MEND and KE compute their losses with the model's dropout off, like every editor
(the direct loops use :func:`~lightning_rome.models.modes.eval_mode`). Lightning keeps each
module's mode as it finds it, and warns once per fit about every module in eval mode; for these
modules that warning names the intended state, so it is dropped, but only when every eval-mode
module lies inside the edited model (a part of the module's own network left in eval mode by
mistake still warns). Each submodule's own mode is given back when the fit ends or fails.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from typing_extensions import override

__all__ = ["EvalModeModel"]

_EVAL_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class _EvalModeDuringFit(pl.Callback):
    """Puts ``module.<attr>`` in eval mode for the fit and restores every submodule's mode after
    it (``on_fit_end`` or ``on_exception``)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr
        self.saved: list[tuple[nn.Module, bool]] = []
        self.filter: tuple[Any, ...] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model: nn.Module = getattr(pl_module, self.attr)
        self.saved = [(m, m.training) for m in model.modules()]
        model.eval()
        inside = {id(m) for m in model.modules()}
        stray = [n for n, m in pl_module.named_modules()
                 if not m.training and id(m) not in inside]
        if not stray:
            warnings.filterwarnings("ignore", message=_EVAL_WARNING, category=PossibleUserWarning)
            self.filter = warnings.filters[0]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drop_filter()  # Lightning has warned (or not) just before this hook

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drop_filter()
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._drop_filter()
        self._restore()

    def _drop_filter(self) -> None:
        if self.filter is not None and self.filter in warnings.filters:
            warnings.filters.remove(self.filter)
        self.filter = None

    def _restore(self) -> None:
        for m, was in self.saved:
            m.training = was
        self.saved = []


class EvalModeModel:
    """Mixin for a LightningModule whose attribute ``eval_mode_attr`` (default ``"model"``) is
    kept in eval mode during ``Trainer.fit`` (through a callback from ``configure_callbacks``);
    every submodule's own mode is given back when the fit ends or fails."""

    eval_mode_attr = "model"

    def configure_callbacks(self) -> list[pl.Callback]:
        return [_EvalModeDuringFit(self.eval_mode_attr)]
