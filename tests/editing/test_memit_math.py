"""MEMIT's algebra: the batch least-squares update, λ → ∞, layer spreading and the z cache."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing.context import read_keys
from lightning_rome.editing.memit import MEMIT, MEMITHyperParams, memit_update

CONTEXTS = ["{}", "Some text. {}"]
REQS = [EditRequest("{} plays the", "Toko Yasuda", "piano"),
        EditRequest("{} lives in", "Varnok Telimar", "Paris"),
        EditRequest("The job of {} is", "Ana Lu", "doctor")]


def C_of(d: int = 128):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    C = A @ A.T / (4 * d)
    return lambda m, t, n: C


def make(layers=(1,), **kw) -> MEMIT:
    hp = {"layers": list(layers), "v_num_grad_steps": 4, "context_templates": CONTEXTS,
          "clamp_norm_factor": 4.0, "mom2_update_weight": 50.0, **kw}
    return MEMIT(hp, second_moment=C_of())


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, n_embd=32, seed=2)


def test_update_solves_the_normal_equations():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, u, lam = 40, 12, 5, 7.0
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / (3 * d_in)
    K = torch.randn(d_in, u, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, u, generator=g, dtype=torch.float64)
    delta = memit_update(K, R, C, lam).dense(torch.float64)
    # Normal equations: Δ (λC + KKᵀ) = R Kᵀ.
    torch.testing.assert_close(delta @ (lam * C + K @ K.T), R @ K.T, rtol=1e-5, atol=1e-5)
    # Independently: least squares of ‖Δ K₀‖² + ‖Δ K − R‖² with K₀K₀ᵀ = λC.
    K0 = torch.linalg.cholesky(lam * C)  # (d_in, d_in)
    X = torch.cat([K0, K], 1).T  # (d_in + u, d_in)
    Y = torch.cat([torch.zeros(d_out, d_in, dtype=torch.float64), R], 1).T
    direct = torch.linalg.lstsq(X, Y).solution.T  # (d_out, d_in)
    torch.testing.assert_close(delta, direct, rtol=1e-4, atol=1e-5)


def _system(d, u, cond=None, seed=3):
    """A positive-definite C ``(d, d)`` (eigenvalues spread over ``cond`` when given), keys
    ``(d, u)`` and residuals ``(12, u)`` in float64."""
    g = torch.Generator().manual_seed(seed)
    if cond is None:
        A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
        C = A @ A.T / (3 * d)
    else:
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ev = torch.logspace(0, -float(torch.log10(torch.tensor(cond))), d, dtype=torch.float64)
        C = (Q * ev) @ Q.T
        C = (C + C.T) / 2
    K = torch.randn(d, u, generator=g, dtype=torch.float64)
    R = torch.randn(12, u, generator=g, dtype=torch.float64)
    return C, K, R


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("d, u", [(60, 1), (60, 10), (60, 59), (60, 60), (40, 100)])
@pytest.mark.parametrize("lam", [7.0, 20000.0])
def test_woodbury_equals_the_dense_solve(d, u, lam):
    """(λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹: the same ΔW as the dense d×d solve, for u < d
    (what "auto" picks) and u ≥ d (Woodbury forced; "auto" solves densely there)."""
    from lightning_rome.editing.memit import cholesky_factor

    C, K, R = _system(d, u)
    dense = memit_update(K, R, C, lam, method="dense").dense(torch.float64)
    # the dense path against the normal equations, independently: Δ (λC + KKᵀ) = R Kᵀ
    assert _rel(dense @ (lam * C + K @ K.T), R @ K.T) < 1e-6
    L = cholesky_factor(C)
    for kw in (dict(method="woodbury"), dict(method="woodbury", factor=L),
               dict(factor=L), dict()):
        got = memit_update(K, R, C, lam, **kw).dense(torch.float64)
        assert _rel(got, dense) <= 1e-6, kw


@pytest.mark.parametrize("cond", [1e6, 1e8])
def test_woodbury_on_a_near_singular_C(cond):
    """An ill-conditioned C (nothing is regularised; cond(λC + KKᵀ) up to ~8e9 here). Both
    solves are backward stable, so they differ by about cond(λC + KKᵀ) x 1e-17 (measured:
    4e-8 at cond(C) = 1e8, 5e-6 at 1e10): still within 1e-6 here."""
    C, K, R = _system(80, 5, cond=cond)
    for lam in (1.0, 20000.0):
        dense = memit_update(K, R, C, lam, method="dense").dense(torch.float64)
        wood = memit_update(K, R, C, lam, method="woodbury").dense(torch.float64)
        assert _rel(wood, dense) <= 1e-6


def test_a_singular_C_falls_back_to_the_dense_solve():
    from lightning_rome.editing.memit import cholesky_factor

    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 10, generator=g, dtype=torch.float64)
    C = A @ A.T  # rank 10 < 30: no Cholesky factor
    K = torch.randn(30, 25, generator=g, dtype=torch.float64)  # KKᵀ fills the rest
    R = torch.randn(12, 25, generator=g, dtype=torch.float64)
    assert cholesky_factor(C) is None
    dense = memit_update(K, R, C, 3.0, method="dense").dense(torch.float64)
    torch.testing.assert_close(memit_update(K, R, C, 3.0).dense(torch.float64), dense,
                               rtol=0, atol=0)
    with pytest.raises(FloatingPointError, match="positive definite"):
        memit_update(K, R, C, 3.0, method="woodbury")
    with pytest.raises(ValueError, match="method"):
        memit_update(K, R, C, 3.0, method="lu")
    with pytest.raises(ValueError, match="shapes"):
        memit_update(K, R[:, :3], C, 3.0)
    with pytest.raises(ValueError, match="factor"):
        memit_update(K, R, C, 3.0, factor=torch.eye(4, dtype=torch.float64))


def test_the_cached_factor_follows_C_and_never_lambda(model, gpt2_tokenizer, monkeypatch):
    """The editor factors each layer's C once; the factor is reused only for that very C,
    unmodified; a new λ reuses it (λ is applied in the solve) and still gives the dense ΔW."""
    import lightning_rome.editing.memit as memit_module

    calls = []
    real = memit_module.cholesky_factor
    monkeypatch.setattr(memit_module, "cholesky_factor",
                        lambda C: calls.append(C) or real(C))
    name = "transformer.h.1.mlp.c_proj"
    base = C_of()(None, None, None)
    memit = make(layers=[1])
    memit.second_moment = lambda m, t, n: base.clone()  # a new tensor at every call
    p1 = memit.edit(model, gpt2_tokenizer, REQS)
    p2 = memit.edit(model, gpt2_tokenizer, REQS)
    assert len(calls) == 1  # one factor for the layer, reused by the second batch
    torch.testing.assert_close(p1.dense(f"{name}.weight"), p2.dense(f"{name}.weight"),
                               rtol=0, atol=0)
    memit.hparams.mom2_update_weight = 5.0  # another λ: the same factor of C
    p3 = memit.edit(model, gpt2_tokenizer, REQS)
    assert len(calls) == 1
    # the dense path on the same editor state gives the same ΔW for this λ
    monkeypatch.setattr(memit_module, "cholesky_factor", lambda C: None)  # "not PD": dense
    memit_dense = make(layers=[1], mom2_update_weight=5.0)
    p_dense = memit_dense.edit(model, gpt2_tokenizer, REQS)
    assert _rel(p3.dense(f"{name}.weight", torch.float64),
                p_dense.dense(f"{name}.weight", torch.float64)) <= 1e-6
    assert _rel(p3.dense(f"{name}.weight", torch.float64),
                p1.dense(f"{name}.weight", torch.float64)) > 1e-3  # λ did change ΔW
    monkeypatch.setattr(memit_module, "cholesky_factor",
                        lambda C: calls.append(C) or real(C))
    C = memit._C_of(model, gpt2_tokenizer, name)
    C.mul_(2.0)  # C changed in place: its factor is recomputed
    memit.edit(model, gpt2_tokenizer, REQS)
    assert len(calls) == 2
    memit.hparams.mom2_n_samples = 123  # other statistics: another C, another factor
    memit.edit(model, gpt2_tokenizer, REQS)
    assert len(calls) == 3


def test_single_request_single_layer_is_the_batch_least_squares_update(model, gpt2_tokenizer):
    memit = make(layers=[2])
    req = REQS[:1]
    patch = memit.edit(model, gpt2_tokenizer, req)
    name = "transformer.h.2.mlp.c_proj"
    # Rebuild the update from its definition on the unedited model.
    Z = memit.compute_z(model, gpt2_tokenizer, req)  # (d, 1), deterministic
    k, _ = read_keys(model, gpt2_tokenizer, name, [c.replace("{}", req[0].prompt)
                                                   for c in CONTEXTS], [req[0].subject] * 2)
    K = k.mean(0, keepdim=True).T.double()  # (d_in, 1)
    _, h = read_keys(model, gpt2_tokenizer, "transformer.h.2", [req[0].prompt],
                     [req[0].subject], outputs=True)
    R = (Z - h.T).double()  # (d, 1): with one layer, all the residual is written here
    C = C_of()(None, None, None)
    K0 = torch.linalg.cholesky(50.0 * C)
    X = torch.cat([K0, K], 1).T
    Y = torch.cat([torch.zeros(32, 128, dtype=torch.float64), R], 1).T
    direct = torch.linalg.lstsq(X, Y).solution.T  # (d_out, d_in)
    torch.testing.assert_close(patch.dense(f"{name}.weight", torch.float64), direct, rtol=1e-3,
                               atol=1e-6)


def test_lambda_to_infinity_gives_a_zero_patch(model, gpt2_tokenizer):
    norms = []
    for lam in (1e1, 1e4, 1e8):
        p = make(layers=[1, 2], mom2_update_weight=lam).edit(model, gpt2_tokenizer, REQS[:2])
        norms.append(sum(p.norms().values()))
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 1e-5 * norms[0]


def test_batch_edit_spreads_over_layers_and_moves_the_residual(model, gpt2_tokenizer):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    memit = make(layers=[0, 1, 2], mom2_update_weight=1.0)
    patch = memit.edit(model, gpt2_tokenizer, REQS)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # edit() leaves the model unchanged
    names = sorted(patch.names)
    assert names == [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(3)]
    assert all(patch.deltas[n].rank == 3 for n in names)
    Z = memit.compute_z(model, gpt2_tokenizer, REQS)  # (d, u)
    h0 = memit._residual_now(model, gpt2_tokenizer, "transformer.h.2", REQS)
    patch.apply(model)
    h1 = memit._residual_now(model, gpt2_tokenizer, "transformer.h.2", REQS)
    patch.revert(model)
    assert (Z - h1).norm() < 0.5 * (Z - h0).norm()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_z_cache_is_reused_and_validated(model, gpt2_tokenizer, tmp_path):
    memit = make(layers=[1], z_cache=str(tmp_path))
    p1 = memit.edit(model, gpt2_tokenizer, REQS[:2])
    assert memit.last_stats["z_cached"] == 0
    files = sorted(tmp_path.glob("z-*.safetensors"))
    assert len(files) == 2
    p2 = memit.edit(model, gpt2_tokenizer, REQS[:2])
    assert memit.last_stats["z_cached"] == 2
    torch.testing.assert_close(p1.dense(p1.names[0]), p2.dense(p2.names[0]))
    files[0].write_bytes(files[0].read_bytes()[:20])  # truncate one
    with pytest.warns(UserWarning, match="corrupt z-vector cache"):
        p3 = memit.edit(model, gpt2_tokenizer, REQS[:2])
    assert memit.last_stats["z_cached"] == 1
    torch.testing.assert_close(p1.dense(p1.names[0]), p3.dense(p3.names[0]))


def test_stream_in_chunks_applies_and_reverts(model, gpt2_tokenizer):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    memit = make(layers=[1])
    patches = list(memit.edit_stream(model, gpt2_tokenizer, REQS, chunk_size=2))
    assert [len(p.requests) for p in patches] == [2, 1]
    assert not torch.equal(model.get_parameter(patches[0].names[0]), before[patches[0].names[0]])
    for p in reversed(patches):
        p.revert(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_bad_input(model, gpt2_tokenizer):
    with pytest.raises(ValueError, match="ascending"):
        MEMITHyperParams(layers=[3, 1])
    with pytest.raises(IndexError, match="out of range"):
        make(layers=[1, 9]).edit(model, gpt2_tokenizer, REQS)
    for name in ("gpt2-xl", "gpt-j-6b"):
        hp = MEMITHyperParams.from_preset(name)
        assert hp.clamp_norm_factor == 0.75
    assert MEMITHyperParams.from_preset("gpt-j-6b").layers == [3, 4, 5, 6, 7, 8]
    assert MEMITHyperParams.from_preset("gpt-j-6b").mom2_update_weight == 15000
    assert MEMITHyperParams.from_preset("gpt2-xl").layers == [13, 14, 15, 16, 17]


def test_editors_pickle_without_their_per_model_caches(model):
    """ddp_spawn pickles callbacks holding editors: the weak per-model caches must not travel."""
    import pickle

    from lightning_rome.editing import ROME

    memit, rome = MEMIT({"layers": [1]}), ROME({"layer": 1})
    memit._C[model] = {"x": torch.eye(2)}
    memit._chol[model] = {"x": torch.eye(2)}
    rome._chol[model] = {"x": torch.eye(2)}
    for editor, cache in ((memit, "_C"), (memit, "_chol"), (rome, "_chol")):
        copy = pickle.loads(pickle.dumps(editor))
        assert len(getattr(copy, cache)) == 0 and len(getattr(editor, cache)) == 1
        assert copy.hparams == editor.hparams


def test_keys_average_within_then_across_template_groups(model, gpt2_tokenizer):
    """As the published code: the bare prompt weighs 1/(number of groups), not 1/(templates)."""
    memit = MEMIT({"layers": [1], "context_template_lengths": [[3, 2], [4, 3]],
                   "context_template_starts": None})
    contexts = memit._contexts(model, gpt2_tokenizer)
    assert len(contexts) == 6 and contexts[0] == "{}"
    w = memit._context_weights(contexts)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 6, 1 / 6, 1 / 9, 1 / 9, 1 / 9]))
    name = "transformer.h.1.mlp.c_proj"
    K = memit._keys(model, gpt2_tokenizer, name, REQS[:2], contexts)  # (d_in, 2)
    for j, r in enumerate(REQS[:2]):
        each = [read_keys(model, gpt2_tokenizer, name, [c.replace("{}", r.prompt)], [r.subject])[0][0]
                for c in contexts]
        bare, g1, g2 = each[0], torch.stack(each[1:3]).mean(0), torch.stack(each[3:]).mean(0)
        torch.testing.assert_close(K[:, j], (bare + g1 + g2) / 3)
    uniform = MEMIT({"layers": [1], "context_templates": contexts})._context_weights(contexts)
    torch.testing.assert_close(uniform, torch.full((6,), 1 / 6))


def _key_at(model, tok, name, text, subject):
    """The input of ``name`` at the subject's last token of ``text`` (one unpadded pass, a plain
    forward hook: independent of the package's key reading)."""
    from lightning_rome.tokens import encode_prompt, subject_span

    full = text.replace("{}", subject)
    idx = subject_span(tok, text, subject)[1] - 1
    seen = {}
    h = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: seen.__setitem__("k", args[0][0, idx].detach().double()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([encode_prompt(tok, full)]))
    finally:
        h.remove()
    return seen["k"]


def test_z_and_delta_do_not_depend_on_z_batch_size(gpt2_tokenizer):
    """Each request stops at early_stop_loss on its own, as the published code (which optimises
    one request at a time): its z, and ΔW, are the same whatever shares its z-batch."""
    from lightning_rome.testing import get_fact_model

    fm = get_fact_model()
    model = fm.model.double()  # float64: batching changes nothing but the rounding
    reqs = fm.edit_requests(9, seed=0)
    C = C_of(4 * model.config.n_embd)
    runs = {}
    for zb in (1, 7, 64):
        memit = MEMIT({"layers": [0], "v_num_grad_steps": 10, "clamp_norm_factor": 12.0,
                       "v_weight_decay": 0.01, "context_templates": CONTEXTS,
                       "mom2_update_weight": 10.0, "z_batch_size": zb, "early_stop_loss": 3.0},
                      second_moment=C)
        patch = memit.edit(model, fm.tokenizer, reqs)
        runs[zb] = (memit.last_stats, patch.dense("transformer.h.0.mlp.c_proj.weight",
                                                  torch.float64))
    steps = runs[64][0]["z_steps_each"]
    assert len(set(steps)) > 2 and min(steps) < 10  # requests did stop at different steps
    for zb in (7, 64):
        assert runs[zb][0]["z_steps_each"] == runs[1][0]["z_steps_each"]
        torch.testing.assert_close(runs[zb][0]["z"], runs[1][0]["z"], rtol=0, atol=1e-6)
        torch.testing.assert_close(runs[zb][1], runs[1][1], rtol=0, atol=1e-6)


def test_published_memit_templates_are_the_default_and_the_presets():
    """memit_main.py:get_context_templates: [["{}"], five texts of 10 tokens from five start
    words], averaged within each group, then over the two groups."""
    published = {"context_template_lengths": [[10, 5]],
                 "context_template_starts": ["The", "Therefore", "Because", "I", "You"],
                 "key_average": "groups", "context_templates": None}
    for hp in (MEMITHyperParams(), MEMITHyperParams.from_preset("gpt2-xl"),
               MEMITHyperParams.from_preset("gpt-j-6b")):
        assert {k: getattr(hp, k) for k in published} == published


def test_generated_groups_start_with_their_start_words(model, gpt2_tokenizer):
    from lightning_rome.editing.context import context_template_groups

    starts = ["The", "Therefore", "Because", "I", "You"]
    groups = context_template_groups(model, gpt2_tokenizer, [[10, 5]], 0, starts=starts)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    for s, t in zip(starts, groups[1]):
        assert t.startswith(s) and t.endswith(". {}")
    with pytest.raises(ValueError, match="multiple of"):
        context_template_groups(model, gpt2_tokenizer, [[10, 4]], 0, starts=starts)
    w = MEMIT()._context_weights(["{}"] + groups[1])
    torch.testing.assert_close(w, torch.tensor([1 / 2] + [1 / 10] * 5))


@pytest.mark.parametrize("average", ["groups", "templates"])
def test_explicit_template_groups_weigh_as_the_published_code(model, gpt2_tokenizer, average):
    """Explicit groups: the bare prompt weighs 1/2 with key_average="groups" (published MEMIT),
    1/6 with "templates"; checked against keys read one prompt at a time."""
    five = ["Some text. {}", "Another line of words. {}", "I. {}", "Yes, and then. {}",
            "The end of it. {}"]
    memit = MEMIT({"layers": [1], "context_templates": [["{}"], five], "key_average": average})
    contexts = memit._contexts(model, gpt2_tokenizer)
    assert contexts == ["{}", *five]
    name = "transformer.h.1.mlp.c_proj"
    K = memit._keys(model, gpt2_tokenizer, name, REQS[:2], contexts)  # (d_in, 2)
    for j, r in enumerate(REQS[:2]):
        each = [_key_at(model, gpt2_tokenizer, name, c.replace("{}", r.prompt), r.subject)
                for c in contexts]
        if average == "groups":
            expect = 0.5 * each[0] + 0.5 * torch.stack(each[1:]).mean(0)
        else:
            expect = torch.stack(each).mean(0)
        torch.testing.assert_close(K[:, j].double(), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly once"):
        MEMITHyperParams(context_templates=[["{}"], ["no brace"]])
    with pytest.raises(ValueError, match="key_average"):
        MEMITHyperParams(key_average="median")
