"""ROMECallback inside a Trainer: when it applies, reverting, checkpoint state, DDP."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from testutils import GPT2_TOKENIZER, tiny_gpt2

from lightning_rome import EditRequest, WeightPatch
from lightning_rome.callbacks import ROMECallback
from lightning_rome.models import load_tokenizer
from lightning_rome.utils.io import tensor_checksum

from .helpers import LMModule

NAME = "transformer.h.1.mlp.c_proj.weight"
CONTEXTS = ["{}", "Some text. {}"]
REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar", case_id=2)


def second_moment(model, tok, name):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(128, 512, generator=g, dtype=torch.float64)
    return A @ A.T / 512


def make_callback(requests=(REQ,), **kwargs) -> ROMECallback:
    hp = {"layer": 1, "v_num_grad_steps": 3, "context_templates": CONTEXTS}
    return ROMECallback(list(requests), hp, second_moment=second_moment, **kwargs)


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs = {"max_steps": 2, **kwargs}
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1,
                      limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, logger=CSVLogger(tmp_path), callbacks=callbacks,
                      log_every_n_steps=1, **kwargs)


@pytest.fixture
def module(gpt2_tokenizer):
    return LMModule(tiny_gpt2(n_layer=3), gpt2_tokenizer)


class Probe(Callback):
    """Records the edited weight's checksum at each hook."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    def _rec(self, hook, pl_module):
        self.seen[hook] = tensor_checksum(pl_module.model.get_parameter(NAME))

    def on_train_start(self, trainer, pl_module):
        self._rec("train_start", pl_module)

    def on_test_batch_start(self, trainer, pl_module, *args):
        self._rec("test_batch", pl_module)


def test_applies_at_fit_start_and_keeps_the_edit(tmp_path, module):
    before = tensor_checksum(module.model.get_parameter(NAME))
    cb, probe = make_callback(save_patch=True), Probe()
    make_trainer(tmp_path, [cb, probe]).fit(module)
    assert cb.applied and probe.seen["train_start"] != before
    # The patch was computed on the original weights and is what the model now holds (lr = 0).
    assert cb.patch.checksums[NAME] == before
    expected = tiny_gpt2(n_layer=3)
    cb.patch.apply(expected)
    assert torch.equal(expected.get_parameter(NAME), module.model.get_parameter(NAME))
    # Logged: delta norms and per-request efficacy.
    assert any(k.startswith("rome/delta_norm/") for k in cb.last_metrics)
    assert "rome/efficacy/2" in cb.last_metrics
    metrics_file = next(Path(tmp_path).rglob("metrics.csv"))
    assert "rome/efficacy_mean" in metrics_file.read_text().splitlines()[0]
    # Saved beside the checkpoints, loadable, and equal.
    saved = list(Path(tmp_path).rglob("rome-*.safetensors"))
    assert len(saved) == 1
    loaded = WeightPatch.load(saved[0])
    torch.testing.assert_close(loaded.dense(NAME), cb.patch.dense(NAME))
    assert loaded.requests == [REQ]


def test_test_start_with_revert_restores_bits(tmp_path, module):
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb, probe = make_callback(apply_on="test_start", revert=True), Probe()
    make_trainer(tmp_path, [cb, probe]).test(module)
    assert probe.seen["test_batch"] != tensor_checksum(before[NAME])
    assert not cb.applied
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before[n]), n


class FitEndSnapshot(Callback):
    """Placed before the edit callback: every parameter at fit end, before the revert."""

    def on_fit_end(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_revert_after_training_subtracts_the_delta(tmp_path, gpt2_tokenizer):
    module = LMModule(tiny_gpt2(n_layer=3), gpt2_tokenizer, lr=1e-2)
    pristine = module.model.get_parameter(NAME).detach().clone()
    cb, snap = make_callback(revert=True), FitEndSnapshot()
    with pytest.warns(UserWarning, match="subtracting the delta"):
        make_trainer(tmp_path, [snap, cb]).fit(module)
    assert not cb.applied
    delta = cb.patch.deltas[NAME]
    dense = (delta.left.double() @ delta.right.double()).float()  # canonical (out, in) = (32, 128)
    trained = snap.params[NAME]  # Conv1D storage (in, out)
    # Training moved the edited weight (else this would be the exact-revert path).
    assert not torch.equal(trained, (pristine.T + dense).T)
    # The revert removed exactly the delta from the trained weight: W_final = W_trained - Δ.
    final = module.model.get_parameter(NAME).detach()
    torch.testing.assert_close(final.T, trained.T - dense, rtol=0, atol=1e-6)
    assert not torch.equal(final, pristine)  # the training's own change is kept
    for n, p in module.model.named_parameters():  # nothing else touched by the revert
        if n != NAME:
            assert torch.equal(p, snap.params[n]), n


def test_state_survives_checkpoint_and_two_instances_coexist(tmp_path, module):
    other = EditRequest("{} lives in", "Varnok Telimar", "Paris", target_true="Rome", case_id=7)
    a, b = make_callback(), make_callback(requests=[other])
    assert a.state_key != b.state_key
    trainer = make_trainer(tmp_path, [a, b])
    trainer.fit(module)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {a.state_key, b.state_key} <= set(state)
    # A fresh callback restores which edits were applied and the patch itself.
    a2 = make_callback()
    a2.load_state_dict(state[a.state_key])
    assert a2.applied and a2.patch.requests == [REQ]
    torch.testing.assert_close(a2.patch.dense(NAME), a.patch.dense(NAME))
    # Resuming fit from the checkpoint does not apply the edit a second time.
    module2 = LMModule(tiny_gpt2(n_layer=3), module.tokenizer)
    a3, b3 = make_callback(), make_callback(requests=[other])
    make_trainer(tmp_path, [a3, b3], max_steps=3).fit(module2, ckpt_path=ckpt)
    assert torch.equal(module2.model.get_parameter(NAME), module.model.get_parameter(NAME))


def test_requests_from_yaml_and_json(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([REQ.to_dict()]))
    (tmp_path / "r.yaml").write_text("- prompt: '{} plays the'\n  subject: Toko Yasuda\n"
                                     "  target_new: piano\n  target_true: guitar\n  case_id: 2\n")
    for f in ("r.json", "r.yaml"):
        assert ROMECallback(str(tmp_path / f)).requests == [REQ]
    with pytest.raises(FileNotFoundError, match="requests file"):
        ROMECallback(str(tmp_path / "missing.json"))


def test_bad_configuration_is_refused():
    with pytest.raises(MisconfigurationException, match="apply_on"):
        make_callback(apply_on="epoch_end")
    with pytest.raises(ValueError, match="exactly once"):
        ROMECallback([{"prompt": "no slot", "subject": "a", "target_new": "b"}])
    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(MisconfigurationException, match="sharded"):
        make_callback()._check_strategy(fake)


class RecordChecksum(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        p = pl_module.model.get_parameter(NAME)
        Path(self.out, f"rank{trainer.global_rank}.txt").write_text(tensor_checksum(p))


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_ranks_hold_identical_weights(tmp_path):
    tok = load_tokenizer(GPT2_TOKENIZER)
    module = LMModule(tiny_gpt2(n_layer=3), tok)
    before = tensor_checksum(module.model.get_parameter(NAME))
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2,
                         strategy="ddp_spawn", max_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False,
                         callbacks=[make_callback(log_efficacy=False), RecordChecksum(
                             str(tmp_path))])
    trainer.fit(module)
    sums = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] == sums[1] != before


def test_memit_and_any_editor_callbacks(tmp_path, module):
    """MEMITCallback and EditorCallback (FT here) apply and revert like ROMECallback."""
    from lightning_rome.callbacks import EditorCallback, MEMITCallback
    from lightning_rome.editing import FT

    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    memit = MEMITCallback([REQ], {"layers": [1, 2], "v_num_grad_steps": 2,
                                  "context_templates": CONTEXTS}, second_moment=second_moment,
                          apply_on="test_start", revert=True)
    ft = EditorCallback([REQ], FT({"layers": [0], "num_steps": 2, "lr": 1e-2}),
                        apply_on="test_start", revert=True)
    assert memit.state_key != ft.state_key
    seen = {}

    class Look(Callback):
        def on_test_batch_start(self, trainer, pl_module, *args):
            for name in ("transformer.h.0.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"):
                seen[name] = not torch.equal(pl_module.model.get_parameter(name), before[name])

    make_trainer(tmp_path, [memit, ft, Look()]).test(module)
    assert all(seen.values()) and len(seen) == 2
    assert sorted(memit.patch.names) == ["transformer.h.1.mlp.c_proj.weight",
                                         "transformer.h.2.mlp.c_proj.weight"]
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(MisconfigurationException, match="edit"):
        EditorCallback([REQ], object())


def test_revert_after_a_checkpoint_resume_is_bit_exact(tmp_path, gpt2_tokenizer):
    """Fit with the edit applied, checkpoint, resume into a fresh model (other initial weights)
    and a fresh callback, revert at the end of the resumed fit: every bit of the original
    weights comes back (the checkpoint carries the patch registry; no subtraction)."""
    import warnings

    from lightning_rome.patches import registered_patch

    module = LMModule(tiny_gpt2(n_layer=3), gpt2_tokenizer)
    original = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb = make_callback(log_efficacy=False)  # applied at fit_start, kept
    trainer = make_trainer(tmp_path, [cb], enable_checkpointing=False)
    trainer.fit(module)
    ckpt = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "lightning_rome_patches" in torch.load(ckpt, weights_only=True)
    fresh = LMModule(tiny_gpt2(n_layer=3, seed=9), gpt2_tokenizer)
    assert not torch.equal(fresh.model.get_parameter(NAME), original[NAME])
    cb2 = make_callback(log_efficacy=False, revert=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*subtract")  # no revert by subtraction
        make_trainer(tmp_path, [cb2], enable_checkpointing=False,
                     max_steps=3).fit(fresh, ckpt_path=ckpt)
    assert not cb2.applied
    assert registered_patch(fresh.model, cb.patch.uid) is None
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p, original[n]), n
