"""MEND: gradient decomposition, editor network, edit, training with Trainer.fit, checkpoints, DDP.

Correctness is checked against independent computations: autograd's gradient of the weight, the
package's scoring routine, a hand-written KL, torch's mean/variance, and the patch applied to the
weights (``WeightPatch.apply``) against the hook-based edited forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from testutils import tiny_gpt2
from tiny_factories import tiny_model

from lightning_rome.data import (
    CounterFactDataModule,
    EditCase,
    EditTrainingBatch,
    EditTrainingCollator,
    RecordBatch,
    ZsREDataModule,
)
from lightning_rome.editing.hypernet import (
    MEND,
    EditorMismatchError,
    LowRankMLP,
    MENDHyperParams,
    MENDNetwork,
    RunningMoments,
    decompose_gradient,
    edit_rows,
    edited_logits,
    locality_kl,
    mend_losses,
    target_row_nll,
)
from lightning_rome.metrics.functional import efficacy_score, neighborhood_score, paraphrase_score
from lightning_rome.models import get_layout
from lightning_rome.modules.mend import MENDModule
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import candidate_nll, forward_logits
from lightning_rome.tokens import fill

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
REQ2 = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English language",
                   "French")


# ------------------------------------------------------------------------------------------------
# Helpers (test_ke.py imports them)


def rows_from_ids(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
    """Right-padded, labelled rows from raw token ids (for models without a tokenizer here)."""
    T = max(len(p) + len(t) for p, t in zip(prompts, targets))
    n = len(prompts)
    ids = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), -100)
    predict = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids[i, :len(p) + len(t)] = torch.tensor([*p, *t])
        mask[i, :len(p) + len(t)] = 1
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        predict[i, len(p) - 1:len(p) - 1 + len(t)] = True
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return SimpleNamespace(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels,
                           predict_mask=predict, case_index=torch.arange(n))


def cf_datamodule(tokenizer, *, limit: int, batch_size: int = 2, mode: str = "edit_train"):
    """A COUNTERFACT DataModule over the first cases of counterfact-val.json."""
    dm = CounterFactDataModule("counterfact/counterfact-val.json", train_split="all",
                               val_split=None, limit=limit, batch_size=batch_size, mode=mode,
                               tokenizer=tokenizer, collator_kwargs={"seed": 0})
    dm.setup("fit")
    return dm


def fit_quietly(module, data, root, *, max_steps: int, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root,
                        num_sanity_val_steps=0, **kwargs)
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    return trainer


@functools.cache
def fact_model_cases(n_train: int = 150, n_held: int = 30):
    """The fact-knowing model and COUNTERFACT-style cases from its knowledge base: the edit prompt
    is a training template of the fact, the paraphrases its two held-out templates, the locality
    prompts two facts of other subjects with the same relation (their own answers). Train and
    held-out cases have different subjects."""
    from lightning_rome.testing.fact_model import get_fact_model

    fm = get_fact_model()
    kb = fm.kb
    cases = []
    for r in kb.edit_requests(n_train + n_held, seed=0):
        fact = kb.fact_of(r)
        neighbors = kb.neighbor_facts(r, 2)
        cases.append(EditCase(
            r, paraphrase_prompts=tuple(fill(t, fact.subject)[0] for t in fact.paraphrase_prompts),
            neighborhood_prompts=tuple(fill(f.train_prompts[0], f.subject)[0] for f in neighbors),
            neighborhood_answers=tuple(f.object for f in neighbors)))
    return fm, cases[:n_train], cases[n_train:]


@contextlib.contextmanager
def one_thread():
    """Train with one intra-op thread: on a shared 2-core machine two threads spin against each
    other (measured: 50 MEND steps took 4 s of CPU with one thread, 72 s with two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_and_evaluate(module, train, held, *, steps: int):
    """ES/PS/NS of the editor on the held-out cases before and after ``steps`` training steps
    (batches of 8 cases, 2 locality rows each, seeded)."""
    fm = fact_model_cases()[0]
    with one_thread():
        before = evaluate_editor(module.editor(), fm.model, fm.tokenizer, held)
        loader = torch.utils.data.DataLoader(
            train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
            collate_fn=EditTrainingCollator(fm.tokenizer, n_loc=2, seed=0))
        fit_quietly(module, loader, None, max_steps=steps)
        after = evaluate_editor(module.editor(), fm.model, fm.tokenizer, held)
    return before, after


def evaluate_editor(editor, model, tokenizer, cases) -> dict[str, float]:
    """ES, PS and NS (the COUNTERFACT probability tests) of edits applied one at a time; the
    model is restored bit-exactly after each."""
    new = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    true = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    for case in cases:
        r = case.request
        groups = {"rewrite": [r.text], "paraphrase": list(case.paraphrase_prompts),
                  "neighborhood": list(case.neighborhood_prompts)}
        prompts = [p for ps in groups.values() for p in ps]
        patch = editor.edit(model, tokenizer, r)
        patch.apply(model)
        try:
            nll = candidate_nll(model, tokenizer, prompts * 2,
                                [r.target_new] * len(prompts) + [r.target_true] * len(prompts))
        finally:
            patch.revert(model)
        mean = torch.stack([x.mean() for x in nll]).view(2, -1)  # (new/true, prompts)
        k = 0
        for g, ps in groups.items():
            new[g].append(mean[0, k:k + len(ps)])
            true[g].append(mean[1, k:k + len(ps)])
            k += len(ps)
    return {"ES": float(efficacy_score(new["rewrite"], true["rewrite"])),
            "PS": float(paraphrase_score(new["paraphrase"], true["paraphrase"])),
            "NS": float(neighborhood_score(new["neighborhood"], true["neighborhood"]))}


def _names(model, layers):
    layout = get_layout(model)
    return [layout.name("mlp_out", layer) for layer in layers]


def _autograd_grads(model, rows, names):
    """∇_W of Σ_rows mean NLL by plain autograd on the weights, canonical [out, in]."""
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    loss = target_row_nll(forward_logits(model, rows), rows).sum()
    grads = torch.autograd.grad(loss, weights)
    return [g.T if type(model.get_submodule(n)).__name__ == "Conv1D" else g
            for g, n in zip(grads, names)]


# ------------------------------------------------------------------------------------------------
# Gradient decomposition


def test_decomposition_is_the_exact_weight_gradient(gpt2_tokenizer):
    """With every token kept, Σ_t δ_t u_tᵀ equals autograd's ∇_W (GPT-2's Conv1D, transposed)."""
    model = tiny_gpt2()
    names = _names(model, [0, 1])
    rows = edit_rows(gpt2_tokenizer, [REQ.text, REQ2.text], [REQ.target_new, REQ2.target_new])
    f = decompose_gradient(model, rows, names, positions="all", case_index=torch.tensor([0, 0]),
                           n_cases=1)
    per_case = decompose_gradient(model, rows, names, positions="all")
    expect = _autograd_grads(model, rows, names)
    for n, g in zip(names, expect):
        assert g.abs().max() > 1e-3  # a real gradient
        torch.testing.assert_close(f[n].gradient(0), g, atol=1e-6, rtol=1e-5)
        # Two cases: their gradients add up to the joint one.
        torch.testing.assert_close(per_case[n].gradient(0) + per_case[n].gradient(1), g,
                                   atol=1e-6, rtol=1e-5)
        assert f[n].mask.sum() == int(rows.attention_mask.sum())


def test_decomposition_of_nn_linear_model():
    """Llama's down_proj is an nn.Linear ([out, in] storage): no transposition."""
    model = tiny_model("llama", vocab_size=100)
    names = _names(model, [1])
    rows = rows_from_ids([[5, 6, 7, 8], [9, 10, 11]], [[12, 13], [14]])
    f = decompose_gradient(model, rows, names, positions="all", n_cases=2)
    g = _autograd_grads(model, rows, names)[0]
    torch.testing.assert_close(f[names[0]].gradient(0) + f[names[0]].gradient(1), g,
                               atol=1e-6, rtol=1e-5)
    assert f[names[0]].u.shape[-1] == 64 and f[names[0]].delta.shape[-1] == 32


def test_target_positions_select_the_target_tokens(gpt2_tokenizer):
    model = tiny_gpt2()
    names = _names(model, [1])
    rows = edit_rows(gpt2_tokenizer, [REQ.text, REQ2.text], [REQ.target_new, REQ2.target_new])
    f = decompose_gradient(model, rows, names)[names[0]]
    n_target = (rows.labels != -100).sum(1).tolist()
    assert n_target == [1, 2]  # " Rome", " English language"
    assert f.mask.sum(1).tolist() == n_target
    # Row 1's factors are u and δ at the two positions predicting its target tokens.
    full = decompose_gradient(model, rows, names, positions="all")[names[0]]
    pos = rows.predict_mask[1].nonzero().flatten()
    torch.testing.assert_close(f.u[1, :2], full.u[1, pos])
    torch.testing.assert_close(f.delta[1, :2], full.delta[1, pos])
    assert torch.equal(f.u[0, 1], torch.zeros_like(f.u[0, 1]))  # padding


# ------------------------------------------------------------------------------------------------
# Editor network


def test_running_moments_match_torch():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 0.5, 10, 1]) + 3
    rm = RunningMoments(6)
    assert torch.equal(rm.normalize(x.float()), x.float())  # no statistics yet: identity
    for chunk in (x[:7], x[7:8], x[8:]):
        rm.update_from_sums(RunningMoments.batch_sums(chunk))
    assert float(rm.count) == 50
    torch.testing.assert_close(rm.mean, x.mean(0))
    torch.testing.assert_close(rm.std, x.std(0))
    z = rm.normalize(x.float())
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-5, rtol=0)
    # A coordinate that was constant so far is floored, not divided by ~0.
    rm2 = RunningMoments(2)
    rm2.update_from_sums(RunningMoments.batch_sums(torch.tensor([[1.0, 5.0], [3.0, 5.0]])))
    out = rm2.normalize(torch.tensor([[2.0, 6.0]]))
    assert out[0, 0] == 0 and abs(float(out[0, 1])) < 1e3


def test_mend_net_is_identity_at_init_and_trainable():
    torch.manual_seed(0)
    net = LowRankMLP(dim=10, rank=4, n_blocks=2, n_layers=3)
    z = torch.randn(5, 10)
    assert torch.equal(net(z, 2), z)
    net(z, 1).pow(2).sum().backward()
    assert net.U.grad.abs().sum() > 0 and net.shift.grad[:, 1].abs().sum() > 0
    assert net.shift.grad[:, 0].abs().sum() == 0  # other layers' modulation is untouched


def test_untrained_mend_is_one_gradient_step(gpt2_tokenizer):
    """Identity network, no statistics: W̃ = W − α ∇_W L exactly (α = edit_lr)."""
    model = tiny_gpt2()
    hp = MENDHyperParams(layers=[0, 1], rank=4, edit_lr=0.5, positions="all")
    editor = MEND(MENDNetwork.for_model(model, hp))
    patch = editor.edit(model, gpt2_tokenizer, REQ)
    rows = edit_rows(gpt2_tokenizer, [REQ.text], [REQ.target_new])
    grads = _autograd_grads(model, rows, _names(model, [0, 1]))
    for n, g in zip(_names(model, [0, 1]), grads):
        torch.testing.assert_close(patch.dense(f"{n}.weight"), -0.5 * g, atol=1e-6, rtol=1e-5)
    target = editor.network.hparams
    assert target.positions == "all"
    # Target positions only: rank = number of target tokens.
    editor.network.hparams = dataclasses.replace(hp, positions="target")
    p2 = editor.edit(model, gpt2_tokenizer, [REQ2])
    assert [d.rank for d in p2.deltas.values()] == [2, 2]


def _perturbed_network(model, layers, seed=0, **kw):
    torch.manual_seed(seed)
    net = MENDNetwork.for_model(model, MENDHyperParams(layers=layers, rank=8, edit_lr=0.3, **kw))
    with torch.no_grad():
        for p in net.parameters():
            if p is not net.alpha:
                p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hook_forward_equals_patched_weights(gpt2_tokenizer, family):
    """The differentiable edited forward (y + ΔW u through hooks) equals the model whose weights
    hold W + ΔW (WeightPatch.apply, canonical orientation); revert restores every bit."""
    model = tiny_gpt2() if family == "gpt2" else tiny_model("llama", vocab_size=50257)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = _perturbed_network(model, [0, 1])
    rows = edit_rows(gpt2_tokenizer, [REQ.text], [REQ.target_new])
    f = decompose_gradient(model, rows, net.module_names)
    with torch.no_grad():
        edits = net(f)
    probe = edit_rows(gpt2_tokenizer, [REQ2.text, "Paris is the capital of"], ["French", "X"],
                      case_index=[0, 0])
    hooked = edited_logits(model, probe, edits)  # (2, T, V)
    patch = MEND(net).edit(model, gpt2_tokenizer, REQ)
    assert all(d.rank == 1 for d in patch.deltas.values())
    for n in net.module_names:
        torch.testing.assert_close(patch.dense(f"{n}.weight"), edits[n].dense(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    patch.apply(model)
    applied = forward_logits(model, probe)
    patch.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = forward_logits(model, probe)
    assert (hooked - plain).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(hooked, applied, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Losses


def test_losses_against_scoring_and_a_hand_written_kl(gpt2_tokenizer):
    model = tiny_gpt2()
    dm = cf_datamodule(gpt2_tokenizer, limit=3)
    batch = next(iter(dm.train_dataloader()))
    net = MENDNetwork.for_model(model, MENDHyperParams(layers=[1], rank=4, edit_lr=0.0))
    out = mend_losses(model, net, batch)
    # α = 0: the edited model is the base model.
    nll = candidate_nll(model, gpt2_tokenizer, batch.equiv.prompts, batch.equiv.targets)
    torch.testing.assert_close(out["edit_nll"], torch.stack([n.mean() for n in nll]).mean())
    assert float(out["loc_kl"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(out["loc_agree"]) == 1.0
    torch.testing.assert_close(out["loss"], 0.1 * out["edit_nll"] + out["loc_kl"])
    # locality_kl against torch's kl_div on two unrelated distributions.
    torch.manual_seed(0)
    p, q = torch.randn(len(batch.loc), batch.loc.input_ids.shape[1], 7), torch.randn(
        len(batch.loc), batch.loc.input_ids.shape[1], 7)
    m = batch.loc.predict_mask
    ref = F.kl_div(F.log_softmax(q[m], -1), F.log_softmax(p[m], -1), log_target=True,
                   reduction="batchmean")
    torch.testing.assert_close(locality_kl(p, q, batch.loc), ref)


def test_batches_without_locality_or_of_cases_are_refused(gpt2_tokenizer):
    model = tiny_gpt2()
    net = MENDNetwork.for_model(model, MENDHyperParams(layers=[1], rank=4))
    dm = cf_datamodule(gpt2_tokenizer, limit=2)
    batch = next(iter(dm.train_dataloader()))
    no_loc = EditTrainingBatch(edit=batch.edit, equiv=batch.equiv, loc=None, cases=batch.cases)
    with pytest.raises(ValueError, match="needs locality examples"):
        mend_losses(model, net, no_loc)
    with pytest.raises(TypeError, match="mode='edit_train'"):
        mend_losses(model, net, RecordBatch(list(batch.cases)))


def test_bad_layers_are_refused(gpt2_tokenizer):
    model = tiny_gpt2()
    with pytest.raises(IndexError, match=r"layer 5 is out of range.*2 layers"):
        MENDModule(model, gpt2_tokenizer, {"layers": [5]})
    with pytest.raises(ValueError, match="distinct"):
        MENDModule(model, gpt2_tokenizer, {"layers": [1, 1]})
    # Default: the last three layers (all two of this model).
    assert MENDModule(model, gpt2_tokenizer, {"rank": 2}).mend_hparams.layers == [0, 1]


# ------------------------------------------------------------------------------------------------
# Trainer.fit, checkpoints


def test_fit_checkpoint_and_reload(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = MENDModule(model, gpt2_tokenizer, {"layers": [0, 1], "rank": 4, "lr": 1e-3,
                                                "lr_alpha": 1e-3})
    init = {k: v.clone() for k, v in module.network.state_dict().items()}
    trainer = fit_quietly(module, cf_datamodule(gpt2_tokenizer, limit=8, batch_size=4),
                          tmp_path, max_steps=2)
    # Only the editor trained; the base model is bit-identical and not in the state dict.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in model.parameters())
    assert not torch.equal(init["alpha"], module.network.alpha.detach())
    assert not torch.equal(init["nets.shape_32x128.U"], module.network.nets["shape_32x128"].U)
    assert float(module.network.norm_u[0].count) > 2
    for key in ("train/loss", "train/edit_nll", "train/loc_kl", "train/edit_acc"):
        assert torch.isfinite(trainer.callback_metrics[key])
    path = tmp_path / "mend.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert all(k.startswith("network.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["hparams"]["layers"] == [0, 1]
    meta = ckpt["lightning_rome_editor"]
    assert set(meta["fingerprint"]) == {"transformer.h.0.mlp.c_proj.weight",
                                        "transformer.h.1.mlp.c_proj.weight"}
    expect = module.edit(REQ)
    reloaded = MENDModule.load_from_checkpoint(path, model=model, tokenizer=gpt2_tokenizer)
    direct = MEND.from_checkpoint(path, model)
    for patch in (reloaded.edit(REQ), direct.edit(model, gpt2_tokenizer, REQ)):
        for n in expect.deltas:
            torch.testing.assert_close(patch.dense(n), expect.dense(n))
        assert patch.method == "mend" and patch.requests == [REQ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_for_another_model_is_refused(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2()
    module = MENDModule(model, gpt2_tokenizer, {"layers": [1], "rank": 4})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = tiny_gpt2(seed=1)
    with pytest.raises(EditorMismatchError, match="fingerprint mismatch"):
        MEND.from_checkpoint(tmp_path / "m.ckpt", other)
    with pytest.raises(EditorMismatchError, match="fingerprint mismatch"):
        MENDModule.load_from_checkpoint(tmp_path / "m.ckpt", model=other,
                                        tokenizer=gpt2_tokenizer)
    wider = tiny_gpt2(n_embd=64)
    with pytest.raises(EditorMismatchError, match="shape"):
        MEND.from_checkpoint(tmp_path / "m.ckpt", wider)
    editor = MEND.from_checkpoint(tmp_path / "m.ckpt", other, check_fingerprint=False)
    assert editor.edit(other, gpt2_tokenizer, REQ).names == ["transformer.h.1.mlp.c_proj.weight"]
    # A loaded editor checks names and shapes of the model it edits (not the bits: an edit
    # may follow other edits).
    good = MEND.from_checkpoint(tmp_path / "m.ckpt", model)
    with pytest.raises(EditorMismatchError, match="shape"):
        good.edit(wider, gpt2_tokenizer, REQ)
    first = good.edit(model, gpt2_tokenizer, REQ)
    first.apply(model)
    second = good.edit(model, gpt2_tokenizer, REQ2)
    first.revert(model)
    assert second.names == first.names


def zsre_edit_nll(editor, model, tokenizer, cases) -> float:
    """Mean target NLL of ``target_new`` on each case's edit prompt and paraphrases with that
    case's edit applied alone (``WeightPatch.apply``, then reverted): the package's scoring
    routine on the patched weights, not the training loss."""
    out = []
    for c in cases:
        r = c.request
        prompts = [r.text, *c.paraphrase_prompts]
        patch = editor.edit(model, tokenizer, r)
        patch.apply(model)
        try:
            nll = candidate_nll(model, tokenizer, prompts, [r.target_new] * len(prompts))
        finally:
            patch.revert(model)
        out.append(float(torch.stack([x.mean() for x in nll]).mean()))
    return sum(out) / len(out)


def test_fit_on_zsre(gpt2_tokenizer, tmp_path):
    """MEND-zsRE: the same module trains on zsRE's training batches (NQ locality questions),
    and the training makes its edits of those facts better: the edited model's NLL of the new
    answers falls (measured: 10.87 before, 10.23 after 10 steps; seeded)."""
    dm = ZsREDataModule("zsre/zsre_mend_train_1k.json", train_split="0:8", batch_size=4,
                        mode="edit_train", tokenizer=gpt2_tokenizer)
    dm.setup("fit")
    cases = dm.train_dataset.records
    assert len(cases) == 8
    torch.manual_seed(0)
    model = tiny_gpt2()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    module = MENDModule(model, gpt2_tokenizer, {"layers": [1], "rank": 4, "lr": 1e-2,
                                                "lr_alpha": 1e-1})
    with one_thread():
        before = zsre_edit_nll(module.editor(), model, gpt2_tokenizer, cases)
        trainer = fit_quietly(module, dm, tmp_path, max_steps=10)
        after = zsre_edit_nll(module.editor(), model, gpt2_tokenizer, cases)
    assert trainer.global_step == 10
    assert after < before - 0.3, (before, after)
    assert "train/loc_kl" in trainer.callback_metrics
    # Only the editor network trained: the base model is bit-identical.
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_training_on_case_batches_is_refused(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2()
    module = MENDModule(model, gpt2_tokenizer, {"layers": [1], "rank": 4})
    dm = cf_datamodule(gpt2_tokenizer, limit=2, mode="cases")
    with pytest.raises(TypeError, match="mode='edit_train'"):
        fit_quietly(module, dm, tmp_path, max_steps=1)


# ------------------------------------------------------------------------------------------------
# DDP


class _SameOnAllRanks(L.Callback):
    def on_train_end(self, trainer, pl_module):
        state = pl_module.network.state_dict()
        for k, v in state.items():
            gathered = trainer.strategy.all_gather(v.double())
            assert torch.equal(gathered[0], gathered[1]), k
        assert float(pl_module.network.norm_u[0].count) > 0


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_fit_under_ddp_spawn(gpt2_tokenizer, tmp_path):
    """Two CPU processes (gloo): the editors and their statistics stay identical on both ranks,
    and the base model is untouched."""
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = MENDModule(model, gpt2_tokenizer, {"layers": [1], "rank": 4, "lr": 1e-3})
    init_alpha = module.network.alpha.detach().clone()
    dm = cf_datamodule(gpt2_tokenizer, limit=8, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[_SameOnAllRanks()],
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(module.network.alpha.detach(), init_alpha)  # results came back
    ckpt = trainer.checkpoint_callback.best_model_path
    assert MEND.from_checkpoint(ckpt, model).edit(model, gpt2_tokenizer, REQ).names


# ------------------------------------------------------------------------------------------------
# The example script


def test_example_script_smoke(shared_data, tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "train_mend_counterfact.py"
    spec = importlib.util.spec_from_file_location("train_mend_counterfact", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--data-dir", str(shared_data), "--steps", "2", "--train-cases", "8",
                         "--eval-cases", "2", "--batch-size", "2", "--n-layer", "2",
                         "--n-embd", "32", "--rank", "4", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| MEND-CF " in out and "| unedited " in out
    assert set(rows) == {"unedited", "MEND-CF (untrained)", "MEND-CF"}
    for row in rows.values():
        assert row["ES"]["n"] == 2 and 0.0 <= row["ES"]["mean"] <= 1.0
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # TensorBoard logs
    assert list(tmp_path.rglob("mend-cf.ckpt"))


# ------------------------------------------------------------------------------------------------
# Training on the fact-knowing model


@pytest.mark.parametrize(("steps", "min_es"), [(100, 0.5), pytest.param(250, 0.65,
                                                                          marks=pytest.mark.slow)])
def test_mend_training_raises_edit_success_on_held_out_edits(steps, min_es):
    """MEND-CF-style training on the fact model's synthetic facts: 150 training subjects, 30
    held-out subjects, each held-out edit applied alone (``WeightPatch.apply``) and scored with
    the COUNTERFACT probability tests (ES on the edit prompt, PS on the two held-out templates,
    NS on two other subjects' facts of the same relation).

    Measured (one thread, batches of 8 cases, rank 32, layers 1-3; about 5 s of CPU per 100
    steps): untrained editor ES 0.00, PS 0.00, NS 1.00; after 100 steps ES 0.70, PS 0.58,
    NS 0.88; after 250 steps (``slow``) ES 0.87, PS 0.87, NS 0.83.
    """
    fm, train, held = fact_model_cases()
    torch.manual_seed(0)
    module = MENDModule(fm.model, fm.tokenizer, MEND_TEST_HPARAMS)
    weights = {k: v.clone() for k, v in fm.model.state_dict().items()}
    before, after = train_and_evaluate(module, train, held, steps=steps)
    assert before["ES"] <= 0.1 and before["NS"] >= 0.95
    assert after["ES"] >= min_es and after["PS"] >= min_es - 0.2
    assert after["NS"] >= 0.65  # the locality bound
    assert all(torch.equal(weights[k], v) for k, v in fm.model.state_dict().items())


MEND_TEST_HPARAMS = {"layers": [1, 2, 3], "rank": 32, "lr": 1e-3, "lr_alpha": 1e-2,
                     "edit_lr": 1e-2}
