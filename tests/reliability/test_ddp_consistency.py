"""Edit callbacks under ``ddp_spawn`` (2 CPU processes): identical weights on every rank after
each edit, and a failure on one rank fails every rank with the same error (no hang), leaving
every rank's weights untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from callbacks.helpers import LMModule
from lightning.pytorch.callbacks import Callback
from testutils import GPT2_TOKENIZER, tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.callbacks import EditorCallback, MEMITCallback, ROMECallback
from lightning_rome.models import load_tokenizer
from lightning_rome.utils.io import tensor_checksum

from .helpers import CONTEXTS, second_moment

REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar", case_id=2)
REQ2 = EditRequest("{} is located in", "Eiffel Tower", "Rome", target_true="Paris", case_id=3)


def model_checksum(model: torch.nn.Module) -> str:
    return hashlib.sha256("".join(tensor_checksum(p) for _, p in sorted(
        model.named_parameters())).encode()).hexdigest()


class AfterEach(Callback):
    """After each edit callback's hook, writes ``{hook}-rank{r}.txt`` with the model checksum."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _write(self, tag: str, trainer, pl_module) -> None:
        Path(self.out, f"{tag}-rank{trainer.global_rank}.txt").write_text(
            model_checksum(pl_module.model))

    def setup(self, trainer, pl_module, stage):
        self._write("setup", trainer, pl_module)  # after ROME (apply_on="setup")

    def on_fit_start(self, trainer, pl_module):
        self._write("fit_start", trainer, pl_module)  # after MEMIT (apply_on="fit_start")

    def on_train_end(self, trainer, pl_module):
        self._write("train_end", trainer, pl_module)  # after FT (apply_on="train_end")


class RecordingROME(ROMECallback):
    """ROMECallback that writes each rank's error and weights checksum when its edit fails."""

    def __init__(self, *args, out: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out = out

    def _apply(self, trainer, pl_module) -> None:
        try:
            super()._apply(trainer, pl_module)
        except Exception as e:
            r = trainer.global_rank
            Path(self.out, f"error-rank{r}.txt").write_text(f"{type(e).__name__}: {e}")
            Path(self.out, f"weights-rank{r}.txt").write_text(model_checksum(pl_module.model))
            raise


class Rank1Module(LMModule):
    """Differs on rank 1 only, to inject a failure there."""

    def __init__(self, *args, fault: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault

    def setup(self, stage):
        if self.trainer.global_rank == 1 and self.fault == "tokenizer":
            self.tokenizer = None  # rank 1 cannot find a tokenizer


class PerturbRank1(Callback):
    """Before the edit (after DDP synchronised the ranks), rank 1's weights drift."""

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank == 1 and pl_module.fault == "weights":
            with torch.no_grad():  # the patch, computed on rank 0's weights, must not apply
                pl_module.model.transformer.h[1].mlp.c_proj.weight[0, 0] += 1.0


def _trainer(tmp_path, callbacks, max_steps: int = 1) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2,
                      strategy="ddp_spawn", max_steps=max_steps, enable_progress_bar=False,
                      enable_model_summary=False, logger=False, enable_checkpointing=False,
                      callbacks=callbacks)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_weights_identical_across_ranks_after_each_edit_callback(tmp_path):
    tok = load_tokenizer(GPT2_TOKENIZER)
    module = LMModule(tiny_gpt2(n_layer=3), tok)
    before = model_checksum(module.model)
    hp = {"v_num_grad_steps": 2, "context_templates": CONTEXTS}
    callbacks = [
        ROMECallback([REQ], {"layer": 1, **hp}, second_moment=second_moment, apply_on="setup",
                     log_efficacy=False),
        MEMITCallback([REQ2], {"layers": [1, 2], **hp}, second_moment=second_moment,
                      apply_on="fit_start", log_efficacy=False),
        EditorCallback([REQ], "ft", {"layers": [0], "num_steps": 2, "lr": 1e-2},
                       apply_on="train_end", log_efficacy=False),
        AfterEach(str(tmp_path)),  # after the edit callbacks: sees each edit applied
    ]
    _trainer(tmp_path, callbacks).fit(module)
    seen = []
    for tag in ("setup", "fit_start", "train_end"):
        r0, r1 = ((tmp_path / f"{tag}-rank{r}.txt").read_text() for r in (0, 1))
        assert r0 == r1, f"ranks differ after the {tag} edit"
        seen.append(r0)
    assert len({before, *seen}) == 4  # every edit changed the weights


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault,message", [
    ("tokenizer", r"failed on rank 1: MisconfigurationException: .*needs a tokenizer"),
    ("weights", r"failed on rank 1: PatchMismatchError: .*does not match the checksum"),
])
def test_a_failure_on_one_rank_fails_every_rank(tmp_path, fault, message):
    import re

    tok = load_tokenizer(GPT2_TOKENIZER)
    module = Rank1Module(tiny_gpt2(n_layer=3), tok, fault=fault)
    hp = {"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS}
    cb = RecordingROME([REQ], hp, second_moment=second_moment, apply_on="fit_start",
                       log_efficacy=False, out=str(tmp_path))
    before = model_checksum(module.model)
    with pytest.raises(Exception, match=message):
        _trainer(tmp_path, [PerturbRank1(), cb]).fit(module)
    errors = [(tmp_path / f"error-rank{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1], errors
    assert re.search(message, errors[0]), errors[0]
    # No rank keeps the edit (rank 1 of the "weights" case holds its own modified weights,
    # and rank 0 has reverted the edit it had applied).
    assert (tmp_path / "weights-rank0.txt").read_text() == before
    if fault != "weights":
        assert (tmp_path / "weights-rank1.txt").read_text() == before
