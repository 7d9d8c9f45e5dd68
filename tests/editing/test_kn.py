"""KN (Knowledge Neurons): integrated-gradients completeness against independently measured
probabilities, neuron selection on hand-made attributions, the value-vector update against the
formula, and the editor's contract (model bit-identical, patch only on the selected columns)."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing import get_editor
from lightning_rome.editing.kn import (
    KN,
    KNHyperParams,
    kn_update,
    neuron_attributions,
    riemann_alphas,
    select_neurons,
)
from lightning_rome.hooks import module_hooks
from lightning_rome.scoring import candidate_probs
from lightning_rome.tokens import continuation_ids, encode_prompt

TEXT = "Toko Yasuda plays the"
REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar")
C_PROJ = "transformer.h.{}.mlp.c_proj"


@pytest.fixture(scope="module")
def model():
    """A tiny GPT-2 whose outputs depend strongly on its MLPs: the (tied) embeddings are scaled
    up so that the next-token distribution is peaked, and the MLP output weights so that zeroing
    one layer's neurons moves P(top-1) by ~1e-2, well above float32 noise."""
    m = tiny_gpt2(n_layer=2, n_embd=32, seed=3)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(30.0)
        for block in m.transformer.h:
            block.mlp.c_proj.weight.mul_(5.0)
    return m


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _prob_with_layer_zeroed(model, ids, target_id, layer=None):
    """P(target) after ``ids``, with the input of ``W_out`` at the last token set to 0 (an
    independent computation of F(0) and, with ``layer=None``, F(ā))."""
    def zero_last(x, name):  # (1, T, d_ff)
        x = x.clone()
        x[:, -1] = 0.0
        return x

    names = [] if layer is None else [C_PROJ.format(layer)]
    with torch.no_grad(), module_hooks(model, names, edit_input=zero_last):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    return float(torch.softmax(logits, -1)[target_id])


def _top1(model, ids):
    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


# ---------------------------------------------------------------------------- attribution
def test_riemann_points():
    torch.testing.assert_close(riemann_alphas(4, "right"),
                               torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(riemann_alphas(4, "left"),
                               torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(riemann_alphas(2, "midpoint"),
                               torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_integrated_gradients_completeness(model, gpt2_tokenizer):
    """Σ_i Attr_i = F(ā) − F(0) per layer, on the joint path that scales all of the layer's
    neurons together; F(0) is measured independently by zeroing the layer's activation."""
    ids = encode_prompt(gpt2_tokenizer, TEXT)
    top = _top1(model, ids)
    p_clean = _prob_with_layer_zeroed(model, ids, top)
    diffs = torch.tensor([p_clean - _prob_with_layer_zeroed(model, ids, top, layer)
                          for layer in (0, 1)], dtype=torch.float64)
    assert bool((diffs.abs() > 1e-3).all())  # the check below is not vacuous

    mid = neuron_attributions(model, gpt2_tokenizer, TEXT, [top], layers=[0, 1], steps=200,
                              batch_size=200, riemann="midpoint")
    assert mid.shape == (2, 128)
    torch.testing.assert_close(mid.sum(1).double(), diffs, rtol=2e-3, atol=1e-6)

    # The paper's right Riemann sum converges to the same value, more slowly (O(1/m)).
    right = {m: neuron_attributions(model, gpt2_tokenizer, TEXT, [top], layers=[0, 1],
                                    steps=m, batch_size=200).sum(1).double() for m in (20, 200)}
    torch.testing.assert_close(right[200], diffs, rtol=1e-2, atol=1e-6)
    assert bool(((right[20] - diffs).abs() > 5 * (right[200] - diffs).abs()).all())


def test_attribution_of_all_target_tokens_is_the_teacher_forced_mean(model, gpt2_tokenizer):
    target = "Shakespeare's"
    t_ids = continuation_ids(gpt2_tokenizer, target)
    assert len(t_ids) >= 2
    p_ids = encode_prompt(gpt2_tokenizer, TEXT)
    extended = TEXT + gpt2_tokenizer.decode(t_ids[:1])
    assert encode_prompt(gpt2_tokenizer, extended) == p_ids + t_ids[:1]
    kw = dict(layers=[0, 1], steps=8, batch_size=8)
    both = neuron_attributions(model, gpt2_tokenizer, TEXT, t_ids[:2], tokens="all", **kw)
    first = neuron_attributions(model, gpt2_tokenizer, TEXT, t_ids[:1], **kw)
    second = neuron_attributions(model, gpt2_tokenizer, extended, t_ids[1:2], **kw)
    torch.testing.assert_close(both, (first + second) / 2, rtol=1e-4, atol=1e-9)
    # "first" ignores the later tokens.
    torch.testing.assert_close(
        neuron_attributions(model, gpt2_tokenizer, TEXT, target, **kw), first)


# ---------------------------------------------------------------------------- selection
def test_select_neurons_threshold_and_refining():
    layers = [3, 7]
    a = torch.tensor([[1.0, 0.25, 0.1, -2.0], [0.0, 0.5, 0.19, 0.3]])  # max 1.0
    b = torch.tensor([[0.0, 0.0, 4.0, 0.0], [0.0, 2.0, 0.0, 0.0]])  # max 4.0
    c = torch.tensor([[0.0, 0.3, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # max 1.0
    kept, coarse = select_neurons([a], layers, adaptive_threshold=0.2)
    assert coarse == [[(3, 0), (3, 1), (7, 1), (7, 3)]]  # > 0.2, strictly; -2.0 is not
    assert kept == coarse[0]
    kept, coarse = select_neurons([a, b, c], layers, adaptive_threshold=0.2, refine=True, p=0.5)
    assert coarse[1] == [(3, 2), (7, 1)]  # 2.0 > 0.8, 4.0 > 0.8
    assert coarse[2] == [(3, 1), (7, 1)]
    assert kept == [(3, 1), (7, 1)]  # in more than 1.5 of the 3 prompts
    union, _ = select_neurons([a, b, c], layers, adaptive_threshold=0.2, refine=False)
    assert union == [(3, 0), (3, 1), (3, 2), (7, 1), (7, 3)]
    kept, _ = select_neurons([a, b, c], layers, adaptive_threshold=0.2, refine=True, p=0.7)
    assert kept == [(7, 1)]  # in all three (> 2.1)
    # A prompt whose attributions are all ≤ 0 has no coarse neurons (not "everything > 0.2·max").
    kept, coarse = select_neurons([-a.abs()], layers)
    assert kept == [] and coarse == [[]]
    with pytest.raises(ValueError, match="d_ff"):
        select_neurons([torch.zeros(3, 4)], layers)


# ---------------------------------------------------------------------------- update
def test_kn_update_touches_only_the_selected_columns(model):
    module = model.get_submodule(C_PROJ.format(1))  # Conv1D: canonical [out, in] = (32, 128)
    g = torch.Generator().manual_seed(0)
    e_o, e_new = torch.randn(32, generator=g), torch.randn(32, generator=g)
    neurons = [5, 17, 100]
    D = kn_update(module, neurons, e_o, e_new, erase_scale=2.0, update_scale=3.0).dense()
    assert D.shape == (32, 128)
    expected = torch.zeros(32, 128)
    for i in neurons:
        expected[:, i] = -2.0 * e_o + 3.0 * e_new
    torch.testing.assert_close(D, expected)
    others = [j for j in range(128) if j not in neurons]
    assert bool((D[:, others] == 0).all())  # exactly zero
    # Scaled by ‖v_i‖/‖E‖: the paper's code.
    W = module.weight.detach().T  # (32, 128)
    D = kn_update(module, neurons, e_o, e_new, erase_scale=1.0, update_scale=8.0,
                  scale_by_value_norm=True).dense()
    for i in neurons:
        v = W[:, i].norm()
        torch.testing.assert_close(D[:, i], -v / e_o.norm() * e_o + 8.0 * v / e_new.norm() * e_new)
    with pytest.raises(IndexError, match="128 neurons"):
        kn_update(module, [128], e_o, e_new, erase_scale=1.0, update_scale=1.0)
    with pytest.raises(ValueError, match="output dimension"):
        kn_update(module, [1], torch.zeros(31), e_new, erase_scale=1.0, update_scale=1.0)


# ---------------------------------------------------------------------------- the editor
def test_edit_patch_matches_the_formula_and_leaves_the_model_identical(model, gpt2_tokenizer):
    before = _snapshot(model)
    kn = KN({"steps": 10, "batch_size": 10, "erase_scale": 2.0, "update_scale": 1.5})
    patch = kn.edit(model, gpt2_tokenizer, REQ)
    _assert_unchanged(model, before)
    res = kn.last_results[0]
    neurons = res["neurons"]
    assert neurons and patch.method == "kn"
    # The selection is select_neurons applied to neuron_attributions of P(target_true).
    A = neuron_attributions(model, gpt2_tokenizer, TEXT, "guitar", layers=[0, 1], steps=10,
                            batch_size=10)
    assert neurons == select_neurons([A], [0, 1], adaptive_threshold=0.2)[0]
    # Each touched W_out changes by −2 E[guitar₀] + 1.5 E[piano₀] on the selected columns only.
    E = model.transformer.wte.weight.detach()
    old, new = continuation_ids(gpt2_tokenizer, "guitar")[0], continuation_ids(
        gpt2_tokenizer, "piano")[0]
    assert res["erase_id"] == old and res["update_ids"] == continuation_ids(gpt2_tokenizer,
                                                                            "piano")
    layers = sorted({lay for lay, _ in neurons})
    assert patch.names == [f"{C_PROJ.format(lay)}.weight" for lay in layers]
    for lay in layers:
        D = patch.dense(f"{C_PROJ.format(lay)}.weight")  # (32, 128)
        cols = [i for la, i in neurons if la == lay]
        expected = torch.zeros(32, 128)
        expected[:, cols] = (-2.0 * E[old] + 1.5 * E[new])[:, None]
        torch.testing.assert_close(D, expected)
        assert bool((D[:, [j for j in range(128) if j not in cols]] == 0).all())


def test_applied_patch_changes_the_mlp_output_by_the_value_vector_update(model, gpt2_tokenizer):
    """Applied, the first edited W_out's output moves by exactly Σ_i a_i Δ[:, i] (its inputs are
    unchanged), and P(target_new) rises."""
    kn = KN({"steps": 10, "batch_size": 10, "update_scale": 1.0})
    patch = kn.edit(model, gpt2_tokenizer, REQ)
    lay = min(la for la, _ in kn.last_results[0]["neurons"])
    name = C_PROJ.format(lay)
    ids = torch.tensor([encode_prompt(gpt2_tokenizer, TEXT)])
    with torch.no_grad(), module_hooks(model, [name], retain_input=True,
                                       retain_output=True) as rec:
        model(ids)
        a, out0 = rec[name].input[0], rec[name].output[0]  # (T, d_ff), (T, d)
        p0 = candidate_probs(model, gpt2_tokenizer, [TEXT], ["piano"])
        patch.apply(model)
        try:
            model(ids)
            out1 = rec[name].output[0]
            p1 = candidate_probs(model, gpt2_tokenizer, [TEXT], ["piano"])
        finally:
            patch.revert(model)
    D = patch.dense(f"{name}.weight")  # (d, d_ff)
    torch.testing.assert_close(out1 - out0, a @ D.T, rtol=1e-4, atol=1e-4)
    assert float(p1[0]) > 100 * float(p0[0])  # 3e-9 -> ~0.75 on this model


def test_sequential_requests_extra_prompts_and_apply(model, gpt2_tokenizer):
    before = _snapshot(model)
    reqs = [REQ, EditRequest("{} is a citizen of", "Toko Yasuda", "France")]
    kn = KN({"steps": 2, "batch_size": 2, "refine": True, "p": 0.5, "layers": [1]})
    extra = [["{} performs on the", "The instrument of {} is the"], []]
    patch = kn.edit(model, gpt2_tokenizer, reqs, extra_prompts=extra)
    _assert_unchanged(model, before)
    assert [len(r["prompts"]) for r in kn.last_results] == [3, 1]
    assert kn.last_results[0]["prompts"][1] == "Toko Yasuda performs on the"
    # Refining: every kept neuron is coarse in at least 2 of the 3 prompts.
    for n in kn.last_results[0]["neurons"]:
        assert sum(n in c for c in kn.last_results[0]["coarse"]) >= 2
    assert patch.names == [f"{C_PROJ.format(1)}.weight"]
    # Sequential: the second request is attributed on the model edited by the first, and the
    # patch is their composition.
    single = KN(kn.hparams)
    first = single.edit(model, gpt2_tokenizer, reqs[0], extra_prompts=extra[0])
    assert single.last_results[0]["neurons"] == kn.last_results[0]["neurons"]
    first.apply(model)
    try:
        top = _top1(model, encode_prompt(gpt2_tokenizer, reqs[1].text))
        second = KN(kn.hparams).edit(model, gpt2_tokenizer, reqs[1])
    finally:
        first.revert(model)
    torch.testing.assert_close(patch.dense(patch.names[0]),
                               first.compose(second).dense(patch.names[0]))
    # No target_true: the attributed (and erased) token is the model's top-1 prediction.
    r2 = kn.last_results[1]
    assert r2["attributed_ids"] == [top] and r2["erase_id"] == top
    # apply=True leaves exactly the returned patch applied; reverting restores the bits.
    patch2 = KN(kn.hparams).edit(model, gpt2_tokenizer, reqs, extra_prompts=extra, apply=True)
    torch.testing.assert_close(patch2.dense(patch.names[0]), patch.dense(patch.names[0]))
    assert not torch.equal(model.transformer.h[1].mlp.c_proj.weight,
                           before["transformer.h.1.mlp.c_proj.weight"])
    patch2.revert(model)
    _assert_unchanged(model, before)


def test_presets_and_registry():
    hp = KNHyperParams.from_preset("gpt2-xl")
    assert (hp.steps, hp.batch_size, hp.adaptive_threshold, hp.refine, hp.p) == (
        20, 20, 0.2, False, 0.4)
    assert (hp.erase_token, hp.update_tokens, hp.erase_scale, hp.update_scale) == (
        "argmax", "all", 2.0, 1.0)
    editor = get_editor("kn", "gpt2-xl")
    assert isinstance(editor, KN) and editor.hparams == hp


def test_bad_input(model, gpt2_tokenizer):
    before = _snapshot(model)
    with pytest.raises(IndexError, match="out of range"):
        KN({"layers": [2]}).edit(model, gpt2_tokenizer, REQ)
    with pytest.raises(IndexError, match="out of range"):
        neuron_attributions(model, gpt2_tokenizer, TEXT, "guitar", layers=[-1])
    with pytest.raises(ValueError, match="target_new"):
        EditRequest("{} plays the", "Toko Yasuda", " ")
    with pytest.raises(ValueError, match="one list of prompts per request"):
        KN().edit(model, gpt2_tokenizer, [REQ, REQ], extra_prompts=[["{} plays"]])
    for bad in ({"steps": 0}, {"riemann": "trapezoid"}, {"adaptive_threshold": 0.0},
                {"p": 1.0}, {"layers": []}, {"update_scale": float("nan")}):
        with pytest.raises(ValueError):
            KNHyperParams(**bad)
    with pytest.raises(ValueError, match="unknown KNHyperParams"):
        KN({"lambda": 1.0})

    # NaN in the MLP activations of layer 1: a clear error, and the model is left as it was.
    def nan_out(x, name):
        x = x.clone()
        x[..., 3] = float("nan")
        return x

    with (module_hooks(model, ["transformer.h.1.mlp.c_fc"], edit_output=nan_out),
          pytest.raises(FloatingPointError, match=r"layer 1\) are NaN")):
        KN({"steps": 2, "batch_size": 2, "layers": [1]}).edit(model, gpt2_tokenizer, REQ)
    _assert_unchanged(model, before)


def test_edit_inside_inference_mode(model, gpt2_tokenizer):
    """Works from a Lightning hook that runs under ``torch.inference_mode``."""
    with torch.inference_mode():
        patch = KN({"steps": 2, "batch_size": 2, "layers": [0]}).edit(model, gpt2_tokenizer, REQ)
    assert patch.names == [f"{C_PROJ.format(0)}.weight"]
