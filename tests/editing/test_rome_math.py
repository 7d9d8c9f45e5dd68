"""ROME's algebra, checked against the closed form (paper, eq. 2) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing.context import ValueOptimisationError, read_keys
from lightning_rome.editing.rome import ROME, ROMEHyperParams, compute_key, insert
from lightning_rome.hooks import module_hooks
from lightning_rome.models import canonical_weight
from lightning_rome.patches import LowRankDelta

D_IN, D_OUT = 128, 32
CONTEXTS = ["{}", "Some text. {}", "Another line of words. {}"]


def random_C(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (4 * d)  # (d, d) a well-conditioned second moment


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, n_embd=D_OUT, seed=1)


def make_rome(**overrides) -> ROME:
    C = random_C(D_IN)
    hp = {"layer": 1, "v_num_grad_steps": 5, "context_templates": CONTEXTS,
          "clamp_norm_factor": 10.0, **overrides}
    return ROME(hp, second_moment=lambda m, t, n: C)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"


@pytest.mark.parametrize("linear", [False, True])
def test_insert_maps_k_star_to_v_star(linear):
    torch.manual_seed(0)
    if linear:
        module = torch.nn.Linear(D_IN, D_OUT).double()
    else:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(D_OUT, D_IN).double()
        torch.nn.init.normal_(module.weight, std=0.1)
        torch.nn.init.normal_(module.bias, std=0.1)
    C = random_C(D_IN)
    k_star, v_star = torch.randn(D_IN, dtype=torch.float64), torch.randn(D_OUT, dtype=torch.float64)
    u = torch.linalg.solve(C, k_star)
    delta = insert(module, k_star, v_star, u)
    W = canonical_weight(module).detach().clone()  # (out, in)
    W_hat = W + delta.dense(torch.float64)
    # Ŵ k* + b = v*, exactly up to float64 rounding.
    torch.testing.assert_close(W_hat @ k_star + module.bias, v_star, rtol=0, atol=1e-5)
    # Other keys move by exactly Λ (C⁻¹k*)ᵀ k.
    Lam = (v_star - (W @ k_star + module.bias)) / (u @ k_star)
    K = torch.linalg.cholesky(C) @ torch.randn(D_IN, 50, dtype=torch.float64)  # keys ~ N(0, C)
    torch.testing.assert_close((W_hat - W) @ K, Lam[:, None] * (u @ K)[None, :], rtol=1e-5,
                               atol=1e-6)


def test_rome_update_is_the_least_squares_optimum():
    """Among rank-one updates that write v* at k*, ROME's disturbs keys drawn from C least."""
    torch.manual_seed(0)
    module = torch.nn.Linear(D_IN, D_OUT, bias=False).double()
    g = torch.Generator().manual_seed(3)
    K = torch.randn(D_IN, 2000, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, D_IN, dtype=torch.float64)[:, None]  # (d_in, n) anisotropic keys
    C = K @ K.T / K.shape[1]
    k_star, v_star = K[:, 0] + 0.5, torch.randn(D_OUT, dtype=torch.float64)
    rome = insert(module, k_star, v_star, torch.linalg.solve(C, k_star)).dense(torch.float64)
    naive = insert(module, k_star, v_star, k_star).dense(torch.float64)  # mom2_adjustment off
    for d in (rome, naive):
        torch.testing.assert_close(d @ k_star, v_star - module.weight @ k_star)
    assert (rome @ K).pow(2).sum() < 0.9 * (naive @ K).pow(2).sum()
    # Any other admissible update (ROME's plus a term vanishing at k*) disturbs more.
    z = torch.randn(D_IN, dtype=torch.float64)
    z = z - (z @ k_star) / (k_star @ k_star) * k_star  # zᵀk* = 0
    other = rome + torch.randn(D_OUT, 1, dtype=torch.float64) * z[None, :] * 0.01
    assert (rome @ K).pow(2).sum() < (other @ K).pow(2).sum()


def test_edit_writes_v_star_at_k_star(model, gpt2_tokenizer):
    rome = make_rome(key_mode="paper")  # the paper's eq. 2 at the averaged key
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    before = weights(model)
    patch = rome.edit(model, gpt2_tokenizer, req)
    assert_unchanged(model, before)  # edit() leaves the model as it was
    res = rome.last_results[0]
    k_star, v_star = res["k_star"], res["v_star"]
    # k* is the average of the keys read in each context template.
    name = "transformer.h.1.mlp.c_proj"
    k_each, _ = read_keys(model, gpt2_tokenizer, name, [c.replace("{}", req.prompt) for c in
                                                        CONTEXTS], [req.subject] * 3)
    torch.testing.assert_close(k_star, k_each.mean(0))
    torch.testing.assert_close(compute_key(model, gpt2_tokenizer, req, rome.hparams), k_star)
    patch.apply(model)
    try:
        out = model.get_submodule(name)(k_star[None].float())[0]
        torch.testing.assert_close(out, v_star, rtol=1e-4, atol=1e-4)
        assert isinstance(patch.deltas[f"{name}.weight"], LowRankDelta)
        assert patch.deltas[f"{name}.weight"].rank == 1
    finally:
        patch.revert(model)
    assert_unchanged(model, before)


def test_mom2_adjustment_off_gives_u_equal_k_star(model, gpt2_tokenizer):
    rome = make_rome(mom2_adjustment=False, key_mode="paper")  # u not normalised
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    patch = rome.edit(model, gpt2_tokenizer, req)
    right = patch.deltas["transformer.h.1.mlp.c_proj.weight"].right[0].double()  # (d_in,)
    k_star = rome.last_results[0]["k_star"].double()
    torch.testing.assert_close(right, k_star, rtol=1e-5, atol=1e-6)


def test_reference_key_mode_writes_v_star_at_bare_key(model, gpt2_tokenizer):
    rome = make_rome(key_mode="reference")
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    patch = rome.edit(model, gpt2_tokenizer, req)
    name = "transformer.h.1.mlp.c_proj"
    delta = patch.deltas[f"{name}.weight"]
    assert abs(float(delta.right.norm()) - 1.0) < 1e-5  # u normalised, as the published code
    k_bare, _ = read_keys(model, gpt2_tokenizer, name, [req.prompt], [req.subject])
    patch.apply(model)
    try:
        out = model.get_submodule(name)(k_bare)[0]
        torch.testing.assert_close(out, rome.last_results[0]["v_star"], rtol=1e-4, atol=1e-4)
    finally:
        patch.revert(model)


def test_sequential_edits_compose(model, gpt2_tokenizer):
    """Three edits one after another, each computed on the model holding the earlier ones.

    With ``u_i = C⁻¹k_i`` and ``f_i`` the edited module after edit ``i`` (``f_0`` the original),
    eq. 2 gives ``f_i(k) = f_{i-1}(k) + Λ_i u_iᵀk`` with ``Λ_i = (v_i − f_{i-1}(k_i)) / u_iᵀk_i``.
    So on the final model the last edit holds exactly, ``f_3(k_3) = v_3``, and each earlier key
    is mapped to ``v_j + Σ_{i>j} Λ_i u_iᵀ k_j``: checked on the module's outputs against this
    recursion run by hand in float64 from the original weights and the editor's (k_i, v_i).
    """
    rome = make_rome(v_num_grad_steps=2, key_mode="paper")  # eq. 2 at k_i, as derived above
    C = random_C(D_IN)  # what make_rome's second moment returns
    reqs = [EditRequest("{} plays the", "Toko Yasuda", "piano"),
            EditRequest("{} lives in", "Varnok Telimar", "Paris"),
            EditRequest("The job of {} is", "Ana Lu", "doctor")]
    before = weights(model)
    name = "transformer.h.1.mlp.c_proj"
    module = model.get_submodule(name)
    W0 = canonical_weight(module).detach().double().clone()  # (out, in)
    b = module.bias.detach().double()
    patch = rome.edit(model, gpt2_tokenizer, reqs, apply=True)
    assert patch.deltas[f"{name}.weight"].rank == 3 and len(patch.requests) == 3
    ks = [r["k_star"].double() for r in rome.last_results]  # (d_in,) each
    vs = [r["v_star"].double() for r in rome.last_results]  # (d_out,) each
    # The recursion by hand.
    W = W0.clone()
    terms = []  # (Λ_i, u_i)
    for k, v in zip(ks, vs):
        u = torch.linalg.solve(C, k)  # (d_in,)
        Lam = (v - (W @ k + b)) / (u @ k)  # (d_out,)
        W = W + Lam[:, None] * u[None, :]
        terms.append((Lam, u))
    try:
        with torch.no_grad():
            out = module(torch.stack(ks).float()).double()  # (3, d_out) on the final model
        torch.testing.assert_close(canonical_weight(module).double(), W, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[2], vs[2], rtol=1e-4, atol=1e-4)  # the last edit holds
        for j in range(2):
            moved = sum(Lam * (u @ ks[j]) for Lam, u in terms[j + 1:])  # (d_out,)
            assert float(moved.norm()) > 1e-2 * float(vs[j].norm())  # a real cross-term
            torch.testing.assert_close(out[j], vs[j] + moved, rtol=1e-4, atol=1e-4)
            # ... and it is the later edits that moved it: v_j itself is no longer written.
            assert not torch.allclose(out[j], vs[j], rtol=1e-4, atol=1e-4)
    finally:
        patch.revert(model)
    assert_unchanged(model, before)


def test_compute_value_works_inside_inference_mode(model, gpt2_tokenizer):
    rome = make_rome(v_num_grad_steps=3)
    with torch.inference_mode():
        patch = rome.edit(model, gpt2_tokenizer, EditRequest("{} plays", "Ana Lu", "piano"))
    assert torch.isfinite(patch.dense("transformer.h.1.mlp.c_proj.weight")).all()


@pytest.mark.parametrize(
    ("request_kwargs", "error", "match"),
    [
        ({"prompt": "plays the", "subject": "Ana", "target_new": "x"}, ValueError, "exactly once"),
        ({"prompt": "{} plays", "subject": "Ana", "target_new": "  "}, ValueError, "target_new"),
        ({"prompt": "{} plays", "subject": "", "target_new": "x"}, ValueError, "subject"),
    ],
)
def test_bad_requests_are_rejected(request_kwargs, error, match):
    with pytest.raises(error, match=match):
        EditRequest(**request_kwargs)


def test_errors_leave_model_unchanged(model, gpt2_tokenizer):
    before = weights(model)
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    with pytest.raises(IndexError, match="out of range"):
        make_rome(layer=7).edit(model, gpt2_tokenizer, req)
    assert_unchanged(model, before)

    # A later request in a sequence fails: the earlier, applied ones are rolled back.
    good = EditRequest("{} plays the", "Toko Yasuda", "piano")
    rome = make_rome(v_num_grad_steps=2)
    calls = {"n": 0}
    original = rome.edit_one

    def failing(m, t, r):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(m, t, r)

    rome.edit_one = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        rome.edit(model, gpt2_tokenizer, [good, good], apply=True)
    assert_unchanged(model, before)

    # Missing statistics corpus.
    rome = ROME({"layer": 1, "context_templates": CONTEXTS, "mom2_dataset": "/no/such/file.txt",
                 "mom2_n_samples": 10})
    with pytest.raises(FileNotFoundError, match="no/such/file"):
        rome.edit(model, gpt2_tokenizer, req)
    assert_unchanged(model, before)


def test_nan_during_value_optimisation_raises(model, gpt2_tokenizer):
    before = weights(model)
    rome = make_rome()
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")

    def poison(x, name):
        return x * float("nan")

    with module_hooks(model, ["transformer.h.2.mlp"], edit_output=poison), pytest.raises(
            ValueOptimisationError, match="non-finite"):
        rome.edit(model, gpt2_tokenizer, req)
    assert_unchanged(model, before)


def test_presets_load():
    for name, layer in [("gpt2-medium", 8), ("gpt2-large", 12), ("gpt2-xl", 17),
                        ("gpt-j-6b", 5), ("gpt-neox-20b", 15), ("llama-7b", 5)]:
        hp = ROMEHyperParams.from_preset(name)
        assert hp.layer == layer
    assert ROMEHyperParams.from_preset("llama-7b").v_weight_decay == 1e-3
    assert ROMEHyperParams.from_preset("gpt2-medium").clamp_norm_factor == 3.0
    with pytest.raises(ValueError, match="unknown rome preset"):
        ROMEHyperParams.from_preset("nope")
    with pytest.raises(ValueError, match="unknown ROMEHyperParams field"):
        ROMEHyperParams.from_dict({"layr": 3})


def _keys_one_by_one(model, tok, name, contexts, req):
    """The input of ``name`` at the subject's last token, one unpadded pass per context, with a
    plain forward hook (independent of the package's key reading). ``(n_ctx, d_in)`` float64."""
    from lightning_rome.tokens import encode_prompt, subject_span

    out = []
    for c in contexts:
        tpl = c.replace("{}", req.prompt)
        idx = subject_span(tok, tpl, req.subject)[1] - 1
        seen = {}
        h = model.get_submodule(name).register_forward_hook(
            lambda m, a, o, seen=seen, idx=idx: seen.__setitem__("k", a[0][0, idx].detach().double()))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([encode_prompt(tok, tpl.replace("{}", req.subject))]))
        finally:
            h.remove()
        out.append(seen["k"])
    return torch.stack(out)


def test_r_rome_writes_z_at_the_averaged_key(model, gpt2_tokenizer):
    """r-ROME: one key everywhere, Ŵ k̄ = v_init + δ (the optimised bare-prompt value), with
    k̄ the template average, u = C⁻¹k̄ normalised."""
    rome = make_rome(key_mode="r-rome")
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    name = "transformer.h.1.mlp.c_proj"
    patch = rome.edit(model, gpt2_tokenizer, req)
    delta = patch.deltas[f"{name}.weight"]
    assert abs(float(delta.right.norm()) - 1.0) < 1e-5
    k_bar = _keys_one_by_one(model, gpt2_tokenizer, name, CONTEXTS, req).mean(0).float()
    z = rome.last_results[0]["z"]
    torch.testing.assert_close(rome.last_results[0]["v_star"], z)
    module = model.get_submodule(name)
    with torch.no_grad():
        before = module(k_bar[None])[0]
    patch.apply(model)
    try:
        with torch.no_grad():
            after = module(k_bar[None])[0]
        torch.testing.assert_close(after, z, rtol=1e-4, atol=1e-4)
        assert float((after - before).norm()) > 1e-2  # the edit moved it
    finally:
        patch.revert(model)
    # The three modes share one key and one value; only the right vector differs.
    modes = make_rome().edit_modes(model, gpt2_tokenizer, req)
    assert set(modes) == {"reference", "r-rome", "paper"}
    dense = {m: p.dense(f"{name}.weight", torch.float64) for m, p in modes.items()}
    torch.testing.assert_close(dense["r-rome"], patch.dense(f"{name}.weight", torch.float64),
                               rtol=1e-5, atol=1e-7)
    assert float((dense["r-rome"] - dense["paper"]).norm()) > 1e-4
    assert float((dense["r-rome"] - dense["reference"]).norm()) > 1e-4


@pytest.mark.parametrize("average", ["templates", "groups"])
def test_key_averages_over_templates_or_groups(model, gpt2_tokenizer, average):
    """Published ROME averages every template equally; with key_average="groups" the average is
    within each group, then over the groups (as published MEMIT)."""
    groups = [["{}"], ["Some text. {}", "Another line of words. {}", "I. {}"]]
    hp = ROMEHyperParams(layer=1, context_templates=groups, key_average=average)
    req = EditRequest("{} plays the", "Toko Yasuda", "piano")
    name = "transformer.h.1.mlp.c_proj"
    k = compute_key(model, gpt2_tokenizer, req, hp).double()
    each = _keys_one_by_one(model, gpt2_tokenizer, name, [t for g in groups for t in g], req)
    expect = each.mean(0) if average == "templates" else 0.5 * each[0] + 0.5 * each[1:].mean(0)
    torch.testing.assert_close(k, expect, rtol=1e-5, atol=1e-6)
    assert float((each.mean(0) - (0.5 * each[0] + 0.5 * each[1:].mean(0))).norm()) > 1e-4
    if average == "groups":  # contexts laid out otherwise than the groups: an error
        with pytest.raises(ValueError, match="template groups"):
            compute_key(model, gpt2_tokenizer, req, hp, contexts=["{}", "Some text. {}"])


def test_key_mode_and_templates_are_validated():
    with pytest.raises(ValueError, match="key_mode"):
        ROMEHyperParams(key_mode="rrome")
    with pytest.raises(ValueError, match="key_average"):
        ROMEHyperParams(key_average="mean")
    with pytest.raises(ValueError, match="exactly once"):
        ROMEHyperParams(context_templates=[["{}", "none"]])
    for bad in ("The", [], [""]):
        with pytest.raises(ValueError, match="context_template_starts"):
            ROMEHyperParams(context_template_starts=bad)


def test_edit_each_is_each_edit_alone(gpt2_tokenizer):
    """``edit_each`` batches the value optimisations of independent single edits: each patch is
    the one ``edit`` gives for its request alone (each request stops on its own, so whatever
    shares its batch changes only the rounding), in the order of the requests, and the model is
    left unchanged."""
    from lightning_rome.testing import get_fact_model

    fm = get_fact_model()
    model = fm.model.double()  # float64: batching changes nothing but the rounding
    tok = fm.tokenizer
    reqs = fm.edit_requests(9, seed=0)
    C = random_C(4 * model.config.n_embd)
    hp = {"layer": 0, "v_num_grad_steps": 10, "clamp_norm_factor": 12.0, "v_weight_decay": 0.01,
          "context_templates": CONTEXTS, "early_stop_loss": 3.0}
    name = "transformer.h.0.mlp.c_proj.weight"
    alone_rome = ROME(hp, second_moment=lambda m, t, n: C)
    alone, alone_results = [], []
    for r in reqs:
        alone.append(alone_rome.edit(model, tok, [r]).dense(name, torch.float64))
        alone_results += alone_rome.last_results
    steps = [x["steps"] for x in alone_results]
    assert len(set(steps)) > 2 and min(steps) < 10  # requests stopped at different steps
    before = weights(model)
    rome = ROME(hp, second_moment=lambda m, t, n: C)
    done: list[int] = []
    patches = rome.edit_each(model, tok, reqs, batch_size=4, progress=done.append)
    assert done == [4, 4, 1]  # one progress call per batch of value optimisations
    assert_unchanged(model, before)
    assert [x["case_id"] for x in rome.last_results] == [r.case_id for r in reqs]
    assert [x["steps"] for x in rome.last_results] == steps
    for p, a, x, y in zip(patches, alone, rome.last_results, alone_results):
        torch.testing.assert_close(p.dense(name, torch.float64), a, rtol=0, atol=1e-6)
        torch.testing.assert_close(x["z"], y["z"], rtol=0, atol=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        rome.edit_each(model, tok, reqs, batch_size=0)
