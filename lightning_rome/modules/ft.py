"""FT and FT+L as a LightningModule: one edit through ``Trainer.fit`` with its logging."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.ft import FTHyperParams, FTState, ft_loss
from lightning_rome.models.loading import resolve_model
from lightning_rome.models.precision import check_tuning_changed
from lightning_rome.modules._frozen import EvalModeModel
from lightning_rome.patches import WeightPatch
from lightning_rome.requests import EditRequest, as_requests, check_batch

__all__ = ["FTModule"]


class _Repeat(Dataset):
    """The same batch of requests at every step (one edit = one small optimisation)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class FTModule(EvalModeModel, pl.LightningModule):
    """Fine-tune a causal LM on edit requests with ``Trainer.fit``: ``training_step`` minimises
    ``−log P[o* | prompt]`` on the chosen layers; with ``norm_constraint`` (FT+L) the weights are
    clamped to ``±ε`` of their originals after every optimiser step. Training stops early once the
    loss is below ``early_stop_loss`` (the Trainer's ``should_stop``).

    The evaluator uses the direct loop of :class:`lightning_rome.editing.FT` instead, which shares
    :func:`~lightning_rome.editing.ft.ft_loss` and :class:`~lightning_rome.editing.ft.FTState`:
    it avoids starting a Trainer inside ``Trainer.test`` for every case.

    Args:
        model: the Hugging Face causal LM (its other parameters are frozen), or its name or
            local path (loaded with :func:`~lightning_rome.models.load_model`, so the module can
            be built from a YAML config).
        tokenizer: its tokenizer (default: the model's, when ``model`` is a name or path).
        requests: the edits.
        hparams: :class:`FTHyperParams`, a dict or a preset name.

    Example:
        >>> module = FTModule(model, [request], {"layers": [1]}, tokenizer=tok)
        >>> L.Trainer(max_steps=25, logger=TensorBoardLogger("logs")).fit(module)
        >>> patch = module.patch()      # a WeightPatch; module.restore() undoes the training
    """

    def __init__(self, model: nn.Module | str, requests: Any,
                 hparams: FTHyperParams | dict[str, Any] | str | None = None,
                 tokenizer: PreTrainedTokenizerBase | str | None = None) -> None:
        super().__init__()
        model, tokenizer = resolve_model(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.requests: list[EditRequest] = check_batch(as_requests(requests), "FTModule")
        self.ft_hparams = FTHyperParams.resolve(hparams)
        self.state = FTState(model, self.ft_hparams)
        self._steps_taken = 0  # optimiser steps so far (an underflow check needs > 0)
        self._base = WeightPatch.from_model(model, {n: torch.zeros(0) for n in self.state.names})
        trainable = {id(p) for p in self.state.params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor | None:
        loss = ft_loss(self.model, self.tokenizer, self.requests)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"FT loss became {value} at step {self.global_step}")
        self.log("ft/loss", loss, prog_bar=True, on_step=True, batch_size=len(self.requests))
        if value < self.ft_hparams.early_stop_loss:
            self.trainer.should_stop = True
            return None  # no optimiser step once converged
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs after this batch's optimiser step: project onto FT+L's L∞ ball.
        self.state.project()
        self._steps_taken += 1

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.state.params, lr=self.ft_hparams.lr,
                                weight_decay=self.ft_hparams.weight_decay)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.ft_hparams.num_steps), batch_size=1)

    def patch(self) -> WeightPatch:
        """The weight change so far as a dense :class:`WeightPatch` (computed against the
        original weights).

        Raises:
            UnderflowError: steps were taken but the bfloat16/float16 weights did not move.
        """
        deltas = self.state.deltas()
        method = "ft-l" if self.ft_hparams.norm_constraint else "ft"
        if self._steps_taken:
            check_tuning_changed(deltas, {n: p.dtype for n, p in zip(self.state.names,
                                                                     self.state.params)}, method)
        return WeightPatch(deltas, method=method, hparams=self.ft_hparams.to_dict(), requests=self.requests,
                           model_name=self._base.model_name, checksums=self._base.checksums)

    def restore(self) -> None:
        """Put the original weights back, bit-exactly."""
        self.state.restore()
