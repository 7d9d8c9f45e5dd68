"""The hypernetwork LightningModules (MEND, KE) own their base model as a frozen submodule:
``.to()`` and ModelSummary see it, it stays in eval mode while the editor trains, checkpoints
leave its weights out, and a checkpoint resumes into a fresh module."""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_summary import ModelSummary
from testutils import tiny_gpt2

from lightning_rome.data import CounterFactDataModule
from lightning_rome.modules import KEModule, MENDModule

HPARAMS = {
    "mend": {"layers": [0, 1], "rank": 4, "lr": 1e-3, "lr_alpha": 1e-3},
    "ke": {"layers": [0, 1], "lstm_hidden": 8, "hidden": 16, "lr": 1e-2},
}


def _module(method: str, model, tokenizer):
    cls = MENDModule if method == "mend" else KEModule
    return cls(model, tokenizer, HPARAMS[method])


def _datamodule(tokenizer, *, limit: int = 4, batch_size: int = 2) -> CounterFactDataModule:
    dm = CounterFactDataModule("counterfact/counterfact-val.json", train_split="all",
                               val_split="all", limit=limit, batch_size=batch_size,
                               mode="edit_train", tokenizer=tokenizer,
                               collator_kwargs={"seed": 0})
    dm.setup("fit")
    return dm


def _trainer(root, **kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
              "enable_model_summary": False, "enable_checkpointing": False,
              "default_root_dir": root, "num_sanity_val_steps": 0, "limit_val_batches": 0,
              **kwargs}
    return L.Trainer(**kwargs)


def _base_names(model) -> set[str]:
    return {f"model.{n}" for n, _ in model.named_parameters()}


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_base_model_is_a_frozen_submodule(gpt2_tokenizer, method):
    model = tiny_gpt2()
    module = _module(method, model, gpt2_tokenizer)
    assert module.model is model
    assert _base_names(model) <= {n for n, _ in module.named_parameters()}
    module.to(torch.float64)  # the base model moves with the module
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in module.network.parameters())
    module.to(torch.float32)
    # ModelSummary counts the base model, as non-trainable; the editor alone is trainable.
    summary = ModelSummary(module, max_depth=1)
    n_base = sum(p.numel() for p in model.parameters())
    n_net = sum(p.numel() for p in module.network.parameters())
    assert summary.total_parameters == n_base + n_net
    assert summary.trainable_parameters == n_net
    assert "model" in summary.layer_names
    # train() leaves the base model in eval mode (no dropout) and frozen.
    module.train()
    assert module.network.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_fit_checkpoint_holds_no_base_weights_and_resumes(gpt2_tokenizer, tmp_path, method):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = _module(method, model, gpt2_tokenizer)
    model.train()  # the user's mode: eval during the fit, given back after it
    dm = _datamodule(gpt2_tokenizer)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=-1)

    class _BaseStaysEval(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert pl_module.network.training
            assert not any(m.training for m in pl_module.model.modules())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                           callbacks=[ckpt_cb, _BaseStaysEval()])
        trainer.fit(module, datamodule=dm)
        # The filter that hid Lightning's warning about the base model's eval mode is gone.
        assert not any(f[1] is not None and "in eval mode" in f[1].pattern
                       for f in warnings.filters)
    # The base model's eval mode is intended: that warning is not shown.
    assert not [w for w in caught if "in eval mode at the start" in str(w.message)]
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = ckpt_cb.best_model_path or str(tmp_path / "last.ckpt")
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("model.") for k in ckpt["state_dict"])
    expected = {f"network.{k}" for k in module.network.state_dict()}
    assert expected <= set(ckpt["state_dict"])
    trained = {k: v.clone() for k, v in module.network.state_dict().items()}

    torch.manual_seed(123)  # another initialisation of the editor
    fresh = _module(method, model, gpt2_tokenizer)
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.network.state_dict().items())
    resumed = _trainer(tmp_path, max_steps=2)
    resumed.fit(fresh, datamodule=_datamodule(gpt2_tokenizer), ckpt_path=path)
    assert resumed.global_step == 2  # restored at step 2: no further step
    for k, v in fresh.network.state_dict().items():
        assert torch.equal(v, trained[k]), k
    if method == "ke":
        assert torch.equal(fresh.lam, module.lam)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_load_state_dict_is_strict_on_the_editor_keys(gpt2_tokenizer, method):
    model = tiny_gpt2()
    module = _module(method, model, gpt2_tokenizer)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("model.")}
    keys = module.load_state_dict(state)  # no base keys: accepted
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    dropped = next(iter(state))
    with pytest.raises(RuntimeError, match=f"missing keys.*{re.escape(dropped)}"):
        module.load_state_dict({k: v for k, v in state.items() if k != dropped})
    with pytest.raises(RuntimeError, match=r"unexpected keys.*network\.extra"):
        module.load_state_dict({**state, "network.extra": torch.zeros(1)})
    keys = module.load_state_dict({k: v for k, v in state.items() if k != dropped},
                                  strict=False)
    assert keys.missing_keys == [dropped]


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_validate_runs_the_base_model_inside_the_trainer(gpt2_tokenizer, tmp_path, method):
    model = tiny_gpt2()
    module = _module(method, model, gpt2_tokenizer)
    out = _trainer(tmp_path, limit_val_batches=1).validate(module,
                                                           datamodule=_datamodule(gpt2_tokenizer))
    assert torch.isfinite(torch.tensor(out[0]["val/loss"]))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_true_bfloat16_precision_reaches_the_base_model(gpt2_tokenizer, tmp_path, method):
    """``precision="bf16-true"`` converts the whole module, base model included (it was left
    in float32 when the base model was kept outside the module tree)."""
    model = tiny_gpt2()
    module = _module(method, model, gpt2_tokenizer)
    seen: dict[str, torch.dtype] = {}

    class _Dtypes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["base"] = next(pl_module.model.parameters()).dtype
            seen["editor"] = next(pl_module.network.parameters()).dtype

    trainer = _trainer(tmp_path, max_steps=1, precision="bf16-true", callbacks=[_Dtypes()])
    trainer.fit(module, datamodule=_datamodule(gpt2_tokenizer))
    assert seen == {"base": torch.bfloat16, "editor": torch.bfloat16}
    if method == "mend":  # its running statistics stay float64 (a bf16 count stalls at 256)
        norm = module.network.norm_u[0]
        assert norm.mean.dtype == norm.m2.dtype == norm.count.dtype == torch.float64
        assert float(norm.count) > 0


def test_running_moments_survive_conversion_and_state_dict_round_trips():
    from lightning_rome.editing.hypernet import RunningMoments

    torch.manual_seed(0)
    x = torch.randn(300, 5, dtype=torch.float64) * 3 + 1
    rm = RunningMoments(5)
    rm.update_from_sums(RunningMoments.batch_sums(x[:200]))
    rm.update_from_sums(RunningMoments.batch_sums(x[200:]))
    rm.to(torch.bfloat16)  # what precision="bf16-true" does to the module tree
    assert float(rm.count) == 300.0 and rm.mean.dtype == torch.float64
    torch.testing.assert_close(rm.mean, x.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rm.std, x.std(0), rtol=1e-12, atol=0)
    other = RunningMoments(5)
    other.load_state_dict(rm.state_dict())
    assert torch.equal(other.mean, rm.mean) and torch.equal(other.m2, rm.m2)
    assert float(other.count) == 300.0
    with pytest.raises(ValueError, match=r"size 4 needs statistics of shape \(9,\)"):
        RunningMoments(4).load_state_dict(rm.state_dict())
