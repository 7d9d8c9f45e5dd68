"""KE (KnowledgeEditor): the update formula, the condition text, the Lagrangian's dual ascent,
training with Trainer.fit, checkpoints, and edit success on the fact-knowing model."""

from __future__ import annotations

import pytest
import torch
from test_mend import (
    REQ,
    REQ2,
    _autograd_grads,
    _names,
    cf_datamodule,
    fact_model_cases,
    fit_quietly,
    one_thread,
    train_and_evaluate,
    zsre_edit_nll,
)
from testutils import tiny_gpt2

from lightning_rome.data import EditTrainingBatch, ZsREDataModule
from lightning_rome.editing.hypernet import (
    KE,
    EditorMismatchError,
    KEHyperParams,
    KENetwork,
    condition_ids,
    edit_rows,
    ke_losses,
    ke_margin,
)
from lightning_rome.modules.ke import KEModule
from lightning_rome.tokens import continuation_ids


def _network(model, tokenizer, **kw):
    hp = KEHyperParams(**{"layers": [0, 1], "lstm_hidden": 8, "hidden": 16, "positions": "all",
                          **kw})
    return KENetwork.for_model(model, hp, tokenizer)


def test_condition_text(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ids, lengths = condition_ids(tok, [REQ, REQ2])
    expect0 = tok(f"{REQ.text} {REQ.target_true}")["input_ids"] + [tok.eos_token_id] + \
        continuation_ids(tok, REQ.target_new)
    assert ids[0, :lengths[0]].tolist() == expect0
    no_true, n = condition_ids(tok, [REQ], with_true=False)
    assert no_true[0, :n[0]].tolist() == tok(REQ.text)["input_ids"] + [tok.eos_token_id] + \
        tok(" Rome")["input_ids"]


def test_untrained_ke_is_a_scaled_gradient_step(gpt2_tokenizer):
    """Initial heads: α = δ = η = 0, β = 0, γ = init_gamma, so ΔW = ¼ · init_gamma · ∇_W L."""
    model = tiny_gpt2()
    net = _network(model, gpt2_tokenizer, init_gamma=-2.0)
    patch = KE(net).edit(model, gpt2_tokenizer, REQ)
    rows = edit_rows(gpt2_tokenizer, [REQ.text], [REQ.target_new])
    for n, g in zip(_names(model, [0, 1]), _autograd_grads(model, rows, _names(model, [0, 1]))):
        torch.testing.assert_close(patch.dense(f"{n}.weight"), 0.25 * -2.0 * g, atol=1e-6,
                                   rtol=1e-5)


def test_update_formula_against_dense_computation(gpt2_tokenizer):
    """ΔW = σ(η)(σ(α)γᵀ ⊙ ∇_W L + σ(δ)βᵀ), formed densely from the heads' outputs and autograd's
    gradient, equals the low-rank patch (rank = tokens + 1)."""
    model = tiny_gpt2()
    torch.manual_seed(0)
    net = _network(model, gpt2_tokenizer)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    patch = KE(net).edit(model, gpt2_tokenizer, REQ2)
    ids, lengths = condition_ids(gpt2_tokenizer, [REQ2])
    with torch.no_grad():
        h = net.condition(net.embed(model, ids), lengths)  # (1, 2H)
    rows = edit_rows(gpt2_tokenizer, [REQ2.text], [REQ2.target_new])
    names = _names(model, [0, 1])
    n_tokens = int(rows.attention_mask.sum())
    for head, n, grad in zip(net.heads, names, _autograd_grads(model, rows, names)):
        with torch.no_grad():
            alpha, gamma, delta, beta, eta = (t[0] for t in head(h))
        dense = torch.sigmoid(eta) * (torch.outer(torch.sigmoid(alpha), gamma) * grad
                                      + torch.outer(torch.sigmoid(delta), beta))  # (out, in)
        assert dense.abs().max() > 1e-3
        torch.testing.assert_close(patch.dense(f"{n}.weight"), dense, atol=1e-5, rtol=1e-4)
        assert patch.deltas[f"{n}.weight"].rank == n_tokens + 1


def test_several_requests_add_up(gpt2_tokenizer):
    model = tiny_gpt2()
    torch.manual_seed(1)
    net = _network(model, gpt2_tokenizer, positions="target")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ed = KE(net)
    both = ed.edit(model, gpt2_tokenizer, [REQ, REQ2])
    one, two = ed.edit(model, gpt2_tokenizer, REQ), ed.edit(model, gpt2_tokenizer, REQ2)
    for n in both.deltas:
        torch.testing.assert_close(both.dense(n), one.dense(n) + two.dense(n), atol=1e-6,
                                   rtol=1e-5)
        assert both.deltas[n].rank == (1 + 1) + (2 + 1)  # target tokens + offset, per request


def test_margin_annealing():
    hp = KEHyperParams(margin=0.01, margin_start=0.1, margin_anneal_steps=10)
    assert [round(ke_margin(hp, s), 4) for s in (0, 5, 10, 50)] == [0.1, 0.055, 0.01, 0.01]
    assert ke_margin(KEHyperParams(margin=0.2), 100) == 0.2


@pytest.mark.parametrize(("lambda_init", "margin"), [(0.5, 10.0), (0.0, 0.0)])
def test_dual_ascent_on_lambda(gpt2_tokenizer, tmp_path, lambda_init, margin):
    """After one step λ = max(0, λ₀ + lr_λ (C − m)), C the locality KL of that step."""
    model = tiny_gpt2()
    module = KEModule(model, gpt2_tokenizer, {"layers": [1], "lstm_hidden": 8, "hidden": 16,
                                              "lambda_init": lambda_init, "margin": margin,
                                              "lr_lambda": 0.5, "init_gamma": -50.0})
    trainer = fit_quietly(module, cf_datamodule(gpt2_tokenizer, limit=2), tmp_path, max_steps=1)
    C = float(trainer.callback_metrics["train/loc_kl"])
    assert C > 0
    assert float(module.lam) == pytest.approx(max(0.0, lambda_init + 0.5 * (C - margin)),
                                              rel=1e-5)
    assert float(trainer.callback_metrics["train/lambda"]) == pytest.approx(lambda_init)
    loss = float(trainer.callback_metrics["train/loss"])
    nll = float(trainer.callback_metrics["train/edit_nll"])
    assert loss == pytest.approx(nll + lambda_init * (C - margin), rel=1e-5)


def test_losses_include_edit_rows(gpt2_tokenizer):
    model = tiny_gpt2()
    net = _network(model, gpt2_tokenizer, init_gamma=0.0)  # ΔW = σ(η)σ(δ)βᵀ = 0 at init
    batch = next(iter(cf_datamodule(gpt2_tokenizer, limit=2).train_dataloader()))
    out = ke_losses(model, net, gpt2_tokenizer, batch, lam=2.0, margin=0.5)
    from lightning_rome.scoring import candidate_nll

    rows = [*zip(batch.edit.prompts, batch.edit.targets),
            *zip(batch.equiv.prompts, batch.equiv.targets)]
    nll = candidate_nll(model, gpt2_tokenizer, [p for p, _ in rows], [t for _, t in rows])
    torch.testing.assert_close(out["edit_nll"], torch.stack([n.mean() for n in nll]).mean())
    assert float(out["loc_kl"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(out["loss"], out["edit_nll"] + 2.0 * (out["loc_kl"] - 0.5))
    no_loc = EditTrainingBatch(edit=batch.edit, equiv=batch.equiv, loc=None, cases=batch.cases)
    with pytest.raises(ValueError, match="needs locality examples"):
        ke_losses(model, net, gpt2_tokenizer, no_loc, lam=0.0, margin=0.0)


def test_fit_checkpoint_reload_and_mismatch(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = KEModule(model, gpt2_tokenizer, {"layers": [0, 1], "lstm_hidden": 8,
                                              "hidden": 16, "lr": 1e-2})
    init = {k: v.clone() for k, v in module.network.state_dict().items()}
    trainer = fit_quietly(module, cf_datamodule(gpt2_tokenizer, limit=4, batch_size=2),
                          tmp_path, max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [k for k, v in module.network.state_dict().items() if not torch.equal(v, init[k])]
    assert "lstm.weight_ih_l0" in changed and "heads.0.outer.weight" in changed
    path = tmp_path / "ke.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["state_dict"]) == {"lam"} | {f"network.{k}" for k in init}
    expect = module.edit(REQ)
    for patch in (KEModule.load_from_checkpoint(path, model=model, tokenizer=gpt2_tokenizer)
                  .edit(REQ), KE.from_checkpoint(path, model).edit(model, gpt2_tokenizer,
                                                                          REQ)):
        for n in expect.deltas:
            torch.testing.assert_close(patch.dense(n), expect.dense(n))
    with pytest.raises(EditorMismatchError, match="fingerprint mismatch"):
        KE.from_checkpoint(path, tiny_gpt2(seed=3))
    with pytest.raises(ValueError, match="holds a 'ke' editor, not 'mend'"):
        from lightning_rome.editing.hypernet import MEND

        MEND.from_checkpoint(path, model)


def test_fit_on_zsre(gpt2_tokenizer, tmp_path):
    """KE-zsRE: the same module trains on zsRE's training batches, its own embedding trains,
    and its edits of those facts get better: the edited model's NLL of the new answers falls
    (measured: 10.45 before, 10.25 after 6 steps; seeded)."""
    dm = ZsREDataModule("zsre/zsre_mend_train_1k.json", train_split="0:8", batch_size=4,
                        mode="edit_train", tokenizer=gpt2_tokenizer)
    dm.setup("fit")
    cases = dm.train_dataset.records
    torch.manual_seed(0)
    model = tiny_gpt2()
    module = KEModule(model, gpt2_tokenizer, {"layers": [1], "lstm_hidden": 8, "hidden": 16,
                                              "embedding": "own", "lr": 3e-2})
    init = module.network.embedding.weight.detach().clone()
    with one_thread():
        before = zsre_edit_nll(module.editor(), model, gpt2_tokenizer, cases)
        trainer = fit_quietly(module, dm, tmp_path, max_steps=6)
        after = zsre_edit_nll(module.editor(), model, gpt2_tokenizer, cases)
    assert trainer.global_step == 6
    assert after < before - 0.1, (before, after)
    assert not torch.equal(module.network.embedding.weight, init)  # its own embedding trains


def test_bad_input(gpt2_tokenizer):
    model = tiny_gpt2()
    with pytest.raises(IndexError, match="out of range"):
        KEModule(model, gpt2_tokenizer, {"layers": [0, 7]})
    with pytest.raises(ValueError, match="needs the tokenizer"):
        KEModule(model, None)
    with pytest.raises(ValueError, match="embedding must be"):
        KEHyperParams(embedding="glove")
    net = KENetwork({"transformer.h.1.mlp.c_proj": (32, 128)},
                    KEHyperParams(embedding="own", lstm_hidden=4, hidden=4), vocab_size=100)
    with pytest.raises(ValueError, match="outside the editor's vocabulary"):
        KE(net).edit(model, gpt2_tokenizer, REQ)


@pytest.mark.parametrize(("steps", "min_es"), [(100, 0.5), pytest.param(250, 0.65,
                                                                          marks=pytest.mark.slow)])
def test_ke_training_raises_edit_success_on_held_out_edits(steps, min_es):
    """KE-CF-style training on the fact model's synthetic facts (150 training subjects, 30
    held-out ones; see ``test_mend_training_raises_edit_success_on_held_out_edits``).

    The untrained editor starts with a small step (``init_gamma = -0.01``: ΔW = −0.0025 ∇W), so
    that the scale of the update must be learnt. Measured (one thread, batches of 8 cases; about
    7 s of CPU per 100 steps): untrained ES 0.00, PS 0.00, NS 1.00; after 100 steps ES 0.80,
    PS 0.77, NS 0.77 (λ = 1.1); after 250 steps (``slow``) ES 0.83, PS 0.83, NS 0.78 (λ = 1.5).
    """
    fm, train, held = fact_model_cases()
    torch.manual_seed(0)
    module = KEModule(fm.model, fm.tokenizer, KE_TEST_HPARAMS)
    before, after = train_and_evaluate(module, train, held, steps=steps)
    assert before["ES"] <= 0.1 and before["NS"] >= 0.95
    assert after["ES"] >= min_es and after["PS"] >= min_es - 0.2
    assert after["NS"] >= 0.65  # the locality bound
    assert float(module.lam) > 0  # the constraint was active


KE_TEST_HPARAMS = {"layers": [1, 2, 3], "lstm_hidden": 32, "hidden": 64, "lr": 3e-3,
                   "init_gamma": -0.01}
