"""FT and FT+L: the direct loop and the LightningModule share one step; FT+L stays in its ball."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing import FT, FTL
from lightning_rome.modules import FTModule
from lightning_rome.scoring import candidate_nll

REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar")
NAME = "transformer.h.1.mlp.c_proj.weight"


@pytest.fixture
def model():
    return tiny_gpt2(n_layer=2, n_embd=32, seed=3)


def test_ft_lowers_the_target_nll_and_restores_the_model(model, gpt2_tokenizer):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nll0 = candidate_nll(model, gpt2_tokenizer, [REQ.text], [REQ.target_new])[0].mean()
    patch = FT({"layers": [1], "lr": 1e-2, "num_steps": 10}).edit(model, gpt2_tokenizer, REQ)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert patch.names == [NAME]
    patch.apply(model)
    nll1 = candidate_nll(model, gpt2_tokenizer, [REQ.text], [REQ.target_new])[0].mean()
    patch.revert(model)
    assert nll1 < nll0 - 0.5


def test_ftl_weights_never_leave_the_eps_ball(model, gpt2_tokenizer):
    eps = 1e-3
    editor = FTL({"layers": [0, 1], "lr": 1e-1, "num_steps": 8, "norm_constraint": eps})
    patch = editor.edit(model, gpt2_tokenizer, REQ)
    for n in patch.names:
        d = patch.dense(n)
        assert float(d.abs().max()) <= eps * (1 + 1e-6) + 1e-7
        assert float(d.abs().max()) > 0.5 * eps  # the constraint is active at lr 0.1
    # The module checks the ball after every optimiser step, through Trainer.fit.
    seen = []

    class Check(pl.Callback):  # callbacks run before the module's own on_train_batch_end
        def _check(self, module):
            for p, p0 in zip(module.state.params, module.state.originals):
                seen.append(float((p.detach() - p0).abs().max()))

        def on_train_batch_start(self, trainer, module, *args):
            self._check(module)

        def on_train_end(self, trainer, module):
            self._check(module)

    module = FTModule(model, [REQ], {"layers": [0, 1], "lr": 1e-1, "num_steps": 8,
                                     "norm_constraint": eps}, tokenizer=gpt2_tokenizer)
    pl.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[Check()]).fit(module)
    assert seen and max(seen) <= eps * (1 + 1e-6) + 1e-7
    module.restore()


def test_module_and_direct_loop_agree(model, gpt2_tokenizer):
    hp = {"layers": [1], "lr": 1e-2, "num_steps": 5, "early_stop_loss": 0.0}
    direct = FT(hp).edit(model, gpt2_tokenizer, REQ)
    module = FTModule(model, [REQ], hp, tokenizer=gpt2_tokenizer)
    pl.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    via_trainer = module.patch()
    module.restore()
    torch.testing.assert_close(via_trainer.dense(NAME), direct.dense(NAME), rtol=1e-4,
                               atol=1e-6)


def test_module_refuses_a_patch_whose_bf16_steps_rounded_away(model, gpt2_tokenizer):
    """FTModule under Trainer.fit in bfloat16 at lr 1e-7: the steps round away, so ``patch()``
    raises instead of returning zeros; before any step it returns the (empty) change."""
    from lightning_rome.models.precision import UnderflowError

    model = model.to(torch.bfloat16)
    module = FTModule(model, [REQ], {"layers": [1], "lr": 1e-7, "num_steps": 3,
                                     "early_stop_loss": 0.0}, tokenizer=gpt2_tokenizer)
    assert not module.patch().dense(NAME).any()  # no step yet: nothing to refuse
    pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    with pytest.raises(UnderflowError, match=r"ft: .*h\.1\.mlp\.c_proj\.weight.*bfloat16"):
        module.patch()
    module.restore()


def test_ft_bad_input(model, gpt2_tokenizer):
    with pytest.raises(IndexError, match="out of range"):
        FT({"layers": [5]}).edit(model, gpt2_tokenizer, REQ)
    with pytest.raises(ValueError, match="norm_constraint"):
        FTL({"layers": [0], "norm_constraint": -1.0})


def test_module_fits_in_eval_mode_without_lightnings_warning_and_restores_modes(
        model, gpt2_tokenizer, recwarn):
    """Like the direct loop, FTModule runs the model without dropout during the fit (with
    Lightning's "modules in eval mode" warning dropped, since that is intended) and gives every
    submodule its own mode back afterwards."""
    model.train()
    model.transformer.h[0].eval()  # a mixed mode, to be restored as it was
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(any(m.training for m in pl_module.model.modules()))

    module = FTModule(model, [REQ], {"layers": [1], "lr": 1e-2, "num_steps": 2,
                                     "early_stop_loss": 0.0}, tokenizer=gpt2_tokenizer)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[Probe()]).fit(module)
    assert seen == [False, False]
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    assert model.training and model.transformer.h[1].training
    assert not model.transformer.h[0].training
    module.restore()
