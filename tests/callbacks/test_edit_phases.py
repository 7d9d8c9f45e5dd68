"""Every apply/revert pair of the edit callbacks, in every Trainer phase.

A BoringModel-style module asserts *inside each step* whether the weights it runs on are the
edited or the pristine ones (by checksum; ``lr=0`` keeps training from changing them), for the
sanity check, fit, validate, test and predict, and for runs interrupted by an exception or a
KeyboardInterrupt. After each run the model must be bit-identical to its start when
``revert=True``.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from testutils import tiny_gpt2

from lightning_rome.callbacks import EditorCallback
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.utils.io import tensor_checksum

from .helpers import LMModule

NAME = "transformer.h.1.mlp.c_proj.weight"  # Conv1D: canonical (32, 128)
REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar", case_id=2)


class FixedEditor:
    """A deterministic rank-one patch of ``NAME``, counting its calls (no optimisation)."""

    method = "fixed"

    def __init__(self) -> None:
        self.calls = 0

    def edit(self, model, tokenizer, requests):
        self.calls += 1
        g = torch.Generator().manual_seed(1)
        delta = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(1, 128, generator=g))
        return WeightPatch.from_model(model, {NAME: delta}, method="fixed",
                                      requests=list(requests))


class PhaseModule(LMModule):
    """Asserts in every step that the weights are edited exactly when ``expect[phase]`` says."""

    def __init__(self, tokenizer, expect: dict[str, bool], fail: str | None = None,
                 fail_with: type[BaseException] = RuntimeError) -> None:
        super().__init__(tiny_gpt2().train(), tokenizer)
        self.pristine = tensor_checksum(self.model.get_parameter(NAME))
        copy = tiny_gpt2()
        FixedEditor().edit(copy, tokenizer, [REQ]).apply(copy)
        self.edited = tensor_checksum(copy.get_parameter(NAME))
        assert self.edited != self.pristine
        self.expect, self.fail, self.fail_with = expect, fail, fail_with
        self.seen: list[tuple[str, bool]] = []

    def _check(self, phase: str) -> None:
        now = tensor_checksum(self.model.get_parameter(NAME))
        assert now in (self.pristine, self.edited), f"{phase}: weights neither edited nor pristine"
        edited = now == self.edited
        self.seen.append((phase, edited))
        assert edited == self.expect[phase], (
            f"{phase} step ran on {'edited' if edited else 'pristine'} weights")
        if self.fail == phase:
            raise self.fail_with(f"injected failure in the {phase} step")

    def training_step(self, batch, batch_idx):
        self._check("train")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._check("sanity" if self.trainer.sanity_checking else "val")
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._check("test")
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self._check("predict")
        return torch.zeros(1)

    def predict_dataloader(self):
        return self._loader()


class EndProbe(Callback):
    """Placed before the edit callback: sees the weights at fit end, before any revert."""

    def __init__(self) -> None:
        self.at_fit_end: str | None = None

    def on_fit_end(self, trainer, pl_module):
        self.at_fit_end = tensor_checksum(pl_module.model.get_parameter(NAME))


def _trainer(tmp_path, callbacks, **kwargs: Any) -> pl.Trainer:
    kwargs = {"max_epochs": 2, "limit_train_batches": 1, "limit_val_batches": 1,
              "limit_test_batches": 1, "limit_predict_batches": 1, "num_sanity_val_steps": 1,
              **kwargs}
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, **kwargs)


ALL = ("sanity", "train", "val", "test", "predict")

# (apply_on, Trainer function, the phases that must see the edit)
CASES = [
    ("validation_start", "fit", {"sanity", "val"}),  # issue 18: training saw the sanity edit
    ("fit_start", "fit", {"sanity", "train", "val"}),
    ("train_end", "fit", set()),
    ("setup", "fit", {"sanity", "train", "val"}),
    ("setup", "validate", {"val"}),
    ("setup", "test", {"test"}),
    ("setup", "predict", {"predict"}),
    ("validation_start", "validate", {"val"}),
    ("validation_start", "test", set()),
    ("test_start", "test", {"test"}),
    ("test_start", "fit", set()),
    ("predict_start", "predict", {"predict"}),
    ("predict_start", "fit", set()),
]


@pytest.mark.parametrize(("apply_on", "fn", "edited"), CASES,
                         ids=[f"{a}-{f}" for a, f, _ in CASES])
def test_revert_pairs_hold_in_every_phase(tmp_path, gpt2_tokenizer, apply_on, fn, edited):
    module = PhaseModule(gpt2_tokenizer, {p: p in edited for p in ALL})
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    editor = FixedEditor()
    cb = EditorCallback([REQ], editor, apply_on=apply_on, revert=True, log_efficacy=False)
    probe = EndProbe()
    getattr(_trainer(tmp_path, [probe, cb]), fn)(module)
    phases = {p for p, _ in module.seen}
    expected_phases = {"fit": {"sanity", "train", "val"}, "validate": {"val"},
                       "test": {"test"}, "predict": {"predict"}}[fn]
    assert phases == expected_phases  # every phase ran (and asserted) at least once
    if apply_on == "train_end":
        assert probe.at_fit_end == module.edited  # it was applied, after training
    assert not cb.applied
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before[n]), n
    if apply_on == "validation_start" and fn == "fit":
        # Applied for the sanity check and for both epochs' validation; computed once (the
        # weights were unchanged, so the same patch is applied again).
        assert [p for p, e in module.seen if e] == ["sanity", "val", "val"]
        assert editor.calls == 1


def test_validation_start_without_revert_keeps_the_edit_from_the_sanity_check(tmp_path,
                                                                              gpt2_tokenizer):
    module = PhaseModule(gpt2_tokenizer, {"sanity": True, "train": True, "val": True})
    cb = EditorCallback([REQ], FixedEditor(), apply_on="validation_start", log_efficacy=False)
    _trainer(tmp_path, [cb]).fit(module)
    assert cb.applied
    assert tensor_checksum(module.model.get_parameter(NAME)) == module.edited


@pytest.mark.parametrize(("apply_on", "fn", "fail", "edited"), [
    ("fit_start", "fit", "train", {"sanity", "train"}),
    ("validation_start", "fit", "val", {"sanity", "val"}),
    ("validation_start", "fit", "sanity", {"sanity"}),
    ("setup", "test", "test", {"test"}),
    ("test_start", "test", "test", {"test"}),
    ("predict_start", "predict", "predict", {"predict"}),
    ("setup", "validate", "val", {"val"}),
])
@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_run_reverts(tmp_path, gpt2_tokenizer, apply_on, fn, fail, edited,
                                    interrupt):
    module = PhaseModule(gpt2_tokenizer, {p: p in edited for p in ALL}, fail=fail,
                         fail_with=interrupt)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb = EditorCallback([REQ], FixedEditor(), apply_on=apply_on, revert=True,
                        log_efficacy=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns a KeyboardInterrupt into on_exception + sys.exit(1).
        expected = SystemExit if interrupt is KeyboardInterrupt else RuntimeError
        with pytest.raises(expected):
            getattr(_trainer(tmp_path, [cb]), fn)(module)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    assert module.seen[-1][0] == fail
    assert not cb.applied
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_an_interrupted_run_keeps_the_edit_without_revert(tmp_path, gpt2_tokenizer):
    module = PhaseModule(gpt2_tokenizer, {"sanity": True, "train": True}, fail="train")
    cb = EditorCallback([REQ], FixedEditor(), apply_on="fit_start", log_efficacy=False)
    with pytest.raises(RuntimeError, match="injected"):
        _trainer(tmp_path, [cb]).fit(module)
    assert cb.applied  # revert=False: the edit is the run's result, and stays
    assert tensor_checksum(module.model.get_parameter(NAME)) == module.edited
