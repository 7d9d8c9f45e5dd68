"""A tiny LightningModule around a Hugging Face causal LM, for callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class LMModule(pl.LightningModule):
    """Language modelling on random token ids; ``lr=0`` keeps the weights fixed."""

    def __init__(self, model, tokenizer, lr: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr

    def _loss(self, batch):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def _loader(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1000, (4, 8), generator=g)
        return DataLoader(TensorDataset(ids), batch_size=2)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()
