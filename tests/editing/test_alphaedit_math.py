"""AlphaEdit against its algebra: the closed form, the null-space property on keys from the
statistics corpus, the preserved keys K_p, the cached eigensystem and exact reverts."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from lightning_rome.editing import AlphaEdit, get_editor
from lightning_rome.editing.alphaedit import (
    AlphaEditHyperParams,
    _eigh_path,
    alphaedit_update,
    mom2_eigh,
    null_space_projector,
)
from lightning_rome.editing.memit import MEMIT
from lightning_rome.hooks import module_hooks
from lightning_rome.stats import get_second_moment, stats_key, stats_path
from lightning_rome.testing import get_fact_model, prefers
from lightning_rome.utils.io import tensor_checksum

LAYER1 = "transformer.h.1.mlp.c_proj"
HP = {"layers": [1], "fact_token": "last", "v_num_grad_steps": 25, "clamp_norm_factor": 12.0,
      "v_weight_decay": 0.01, "context_template_lengths": [[6, 2]],
      "context_template_starts": None, "key_average": "templates", "mom2_n_samples": 2000,
      "nullspace_threshold": 1e-3, "l2_weight": 0.01}


def _rand_problem(seed: int = 0, d_in: int = 30, d_out: int = 9, u: int = 4, n_p: int = 6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, 2 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / (2 * d_in)
    evals, evecs = torch.linalg.eigh(C)
    tau = float(evals[d_in // 2])  # half the spectrum is the "null space"
    P = null_space_projector(evals, evecs, tau)
    K = torch.randn(d_in, u, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, u, generator=g, dtype=torch.float64)
    Kp = torch.randn(d_in, n_p, generator=g, dtype=torch.float64)
    return evals, evecs, tau, P, K, R, Kp


def test_projector_is_the_orthogonal_projector_on_the_small_eigenvectors():
    evals, evecs, tau, P, *_ = _rand_problem()
    r = int((evals < tau).sum())
    torch.testing.assert_close(P, P.T)
    torch.testing.assert_close(P @ P, P, atol=1e-12, rtol=0)
    assert round(float(torch.trace(P))) == r
    # It kills the large-eigenvalue directions and keeps the small ones.
    big, small = evecs[:, evals >= tau], evecs[:, evals < tau]
    assert float((P @ big).abs().max()) < 1e-12
    torch.testing.assert_close(P @ small, small, atol=1e-12, rtol=0)


@pytest.mark.parametrize("with_kp", [False, True])
def test_update_is_the_dense_closed_form_and_the_subspace_least_squares(with_kp):
    evals, evecs, tau, P, K, R, Kp = _rand_problem(1)
    alpha = 0.7
    G = Kp @ Kp.T if with_kp else None
    delta = alphaedit_update(K, R, P, G, alpha).dense(torch.float64)  # (d_out, d_in)
    # The paper's formula, computed densely with an explicit inverse.
    Gd = G if G is not None else torch.zeros_like(P)
    eye = torch.eye(P.shape[0], dtype=torch.float64)
    dense = R @ K.T @ P @ torch.linalg.inv(Gd @ P + K @ K.T @ P + alpha * eye)
    torch.testing.assert_close(delta, dense, rtol=1e-5, atol=1e-6)
    # Independently: Δ = A Ûᵀ, A minimising ‖A ÛᵀK − R‖² + ‖A ÛᵀK_p‖² + α‖A‖², by lstsq.
    U = evecs[:, evals < tau]  # (d_in, r)
    blocks_x = [(U.T @ K).T, (alpha ** 0.5) * torch.eye(U.shape[1], dtype=torch.float64)]
    blocks_y = [R.T, torch.zeros(U.shape[1], R.shape[0], dtype=torch.float64)]
    if with_kp:
        blocks_x.insert(1, (U.T @ Kp).T)
        blocks_y.insert(1, torch.zeros(Kp.shape[1], R.shape[0], dtype=torch.float64))
    A = torch.linalg.lstsq(torch.cat(blocks_x), torch.cat(blocks_y)).solution.T  # (d_out, r)
    torch.testing.assert_close(delta, A @ U.T, rtol=1e-4, atol=1e-6)
    # The update lies in the null space: Δ = Δ P, so Δ k = 0 for k in the span of the big ones.
    # (to float32 rounding: the factors are stored in float32)
    torch.testing.assert_close(delta @ P, delta, rtol=0, atol=1e-6 * float(delta.abs().max()))
    assert float((delta @ evecs[:, evals >= tau]).abs().max()) < 1e-6 * float(delta.abs().max())


@pytest.fixture(scope="module")
def fm():
    return get_fact_model()


@pytest.fixture(scope="module")
def corpus(fm):
    return list(fm.kb.text_corpus())


def _corpus_keys(model, tok, name, texts):
    """The module's input at every real token of ``texts`` (d_in, n)."""
    from lightning_rome.scoring import make_batch
    from lightning_rome.tokens import encode_prompt

    batch = make_batch(tok, [encode_prompt(tok, t) for t in texts], "right", torch.device("cpu"))
    with torch.no_grad(), module_hooks(model, [name], retain_input=True) as rec:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids)
    k = rec[name].input[batch.attention_mask.bool()]  # (n, d_in)
    return k.double().T  # (d_in, n)


def test_delta_on_preserved_keys_is_within_the_null_space_energy(fm, corpus):
    """``‖Δ K₀‖_F ≤ ‖Δ‖₂ ‖P K₀‖_F`` since Δ = ΔP; for keys K₀ of the statistics corpus,
    ``‖P K₀‖²_F ≈ n Σ_{σ<τ} σ`` while ``‖K₀‖²_F ≈ n tr C``. Stated tolerance: the relative error
    ``‖ΔK₀‖_F / (‖Δ‖_F ‖K₀‖_F)`` is at most ``1.5 sqrt(Σ_{σ<τ} σ / tr C)``, itself below 0.075 here; on
    the part of K₀ outside the null space it is below 1e-5 (float32 rounding)."""
    model, tok = fm.model, fm.tokenizer
    reqs = fm.edit_requests(3, seed=3)
    ae = AlphaEdit(HP, corpus=corpus)
    patch = ae.edit(model, tok, reqs)
    delta = patch.dense(f"{LAYER1}.weight", torch.float64)  # (d_out, d_in)
    K0 = _corpus_keys(model, tok, LAYER1, corpus[:300])  # (d_in, n)
    rel = float((delta @ K0).norm() / (delta.norm() * K0.norm()))
    C = get_second_moment(model, tok, LAYER1, corpus=corpus, n_samples=2000,
                          dtype=torch.float32, progress=False).mom2.double()
    evals = torch.linalg.eigvalsh(C)
    bound = float((evals[evals < HP["nullspace_threshold"]].sum() / evals.sum()).sqrt())
    assert bound < 0.05
    assert rel <= 1.5 * bound, (rel, bound)
    P = ae.projector(model, tok, LAYER1)
    assert float((delta @ K0).norm()) <= float(torch.linalg.matrix_norm(delta, 2)) * float(
        (P @ K0).norm()) * (1 + 1e-6)
    # On the preserved keys' part outside the null space, (I − P) K₀, AlphaEdit writes nothing
    # (to float32 rounding); MEMIT (same keys, residuals and layer, λ = 100) does.
    Q = torch.eye(P.shape[0], dtype=torch.float64) - P
    out_ae = float((delta @ Q @ K0).norm() / (delta.norm() * K0.norm()))
    assert out_ae < 1e-5, out_ae
    mem = MEMIT({k: v for k, v in HP.items() if k not in ("nullspace_threshold", "l2_weight")}
                | {"mom2_update_weight": 100.0}, second_moment=lambda m, t, n: C)
    d_m = mem.edit(model, tok, reqs).dense(f"{LAYER1}.weight", torch.float64)
    out_m = float((d_m @ Q @ K0).norm() / (d_m.norm() * K0.norm()))
    assert out_m > 100 * out_ae, (out_m, out_ae)


def test_edit_works_reverts_bit_exactly_and_leaves_the_model_unchanged(fm, corpus):
    model, tok = fm.model, fm.tokenizer
    before = {n: tensor_checksum(p) for n, p in model.named_parameters()}
    reqs = fm.edit_requests(2, seed=5)
    ae = get_editor("alphaedit", HP, corpus=corpus)
    assert isinstance(ae, AlphaEdit)
    model.train()
    patch = ae.edit(model, tok, reqs)
    assert model.training  # the previous mode is restored
    model.eval()
    assert {n: tensor_checksum(p) for n, p in model.named_parameters()} == before
    assert patch.method == "alphaedit" and patch.names == [f"{LAYER1}.weight"]
    patch.apply(model)
    assert all(prefers(model, tok, [r.text for r in reqs], [r.target_new for r in reqs],
                       [r.target_true for r in reqs]))
    patch.revert(model)
    assert {n: tensor_checksum(p) for n, p in model.named_parameters()} == before


def test_preserved_keys_protect_earlier_edits_and_round_trip_through_state(fm, corpus):
    model, tok = fm.model, fm.tokenizer
    r1, r2 = fm.edit_requests(2, seed=7)
    ae = AlphaEdit(HP, corpus=corpus)
    p1 = ae.edit(model, tok, [r1], apply=True)
    try:
        kp = ae.preserved_keys[LAYER1]
        assert kp.shape == (384, 1) and ae.n_preserved_edits == 1
        # The state survives torch.save / torch.load(weights_only=True).
        buf = io.BytesIO()
        torch.save(ae.state_dict(), buf)
        buf.seek(0)
        restored = AlphaEdit(HP, corpus=corpus)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(restored.preserved_keys[LAYER1], kp)
        with_kp = ae.edit(model, tok, [r2]).dense(f"{LAYER1}.weight", torch.float64)
        again = restored.edit(model, tok, [r2]).dense(f"{LAYER1}.weight", torch.float64)
        torch.testing.assert_close(with_kp, again, rtol=0, atol=0)
        fresh = AlphaEdit(HP, corpus=corpus)
        without = fresh.edit(model, tok, [r2]).dense(f"{LAYER1}.weight", torch.float64)
        k = kp.double()
        assert float((with_kp @ k).norm()) < 0.5 * float((without @ k).norm())
        ae.reset_preserved_keys()
        assert ae.preserved_keys == {} and ae.n_preserved_edits == 0
    finally:
        p1.revert(model)


def test_bad_state_and_foreign_model_are_refused(fm, corpus):
    ae = AlphaEdit(HP, corpus=corpus)
    with pytest.raises(ValueError, match="not an AlphaEdit state"):
        ae.load_state_dict({"keys": {}})
    state = {"header": '{"format": "lightning_rome.alphaedit_state", "version": 1, '
                       '"hparams": {"layers": [1]}, "model": null, "n_edits": 2, "history": '
                       '[{"n": 2, "pre": {}, "post": {}}], '
                       '"modules": ["transformer.h.1.mlp.c_proj"]}',
             "keys": {LAYER1: torch.full((384, 2), float("nan"))}}
    with pytest.raises(ValueError, match="bad preserved keys"):
        ae.load_state_dict(state)
    assert ae.preserved_keys == {}
    ae._model_id = {"modules": [LAYER1], "model": {"weights": "another"}}
    before = tensor_checksum(fm.model.get_parameter(f"{LAYER1}.weight"))
    with pytest.raises(ValueError, match="another model"):
        ae.edit(fm.model, fm.tokenizer, fm.edit_requests(1, seed=2))
    assert tensor_checksum(fm.model.get_parameter(f"{LAYER1}.weight")) == before


def test_empty_null_space_is_an_error(fm, corpus):
    ae = AlphaEdit({**HP, "nullspace_threshold": 1e-12}, corpus=corpus)
    before = tensor_checksum(fm.model.get_parameter(f"{LAYER1}.weight"))
    with pytest.raises(ValueError, match=r"null space .* is empty"):
        ae.edit(fm.model, fm.tokenizer, fm.edit_requests(1, seed=2))
    assert tensor_checksum(fm.model.get_parameter(f"{LAYER1}.weight")) == before
    with pytest.raises(ValueError, match="nullspace_threshold"):
        AlphaEditHyperParams(nullspace_threshold=0.0)
    with pytest.raises(ValueError, match="l2_weight"):
        AlphaEditHyperParams(l2_weight=-1.0)


def test_eigensystem_is_cached_beside_the_statistics_and_validated(fm, corpus, tmp_path,
                                                                  monkeypatch):
    model, tok = fm.model, fm.tokenizer
    texts = corpus[:200]
    evals, evecs = mom2_eigh(model, tok, LAYER1, corpus=texts, n_samples=200, cache=tmp_path)
    C = get_second_moment(model, tok, LAYER1, corpus=texts, n_samples=200, dtype=torch.float32,
                          cache=tmp_path).mom2.double()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, C, rtol=1e-8, atol=1e-9)
    from lightning_rome.corpora import as_corpus
    from lightning_rome.stats.collect import default_seq_len

    key = stats_key(model, tok, LAYER1, corpus_id=as_corpus(texts).identity, n_samples=200,
                    n_tokens=None, seq_len=default_seq_len(model), dtype=torch.float32)
    path = _eigh_path(stats_path(tmp_path, key))
    assert path.is_file() and stats_path(tmp_path, key).is_file()
    # A second call reads the file (no decomposition).
    def no_eigh(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    e2, v2 = mom2_eigh(model, tok, LAYER1, corpus=texts, n_samples=200, cache=tmp_path)
    assert torch.equal(e2, evals) and torch.equal(v2, evecs)
    monkeypatch.undo()
    # A damaged file is refused with a warning and recomputed.
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e3, _ = mom2_eigh(model, tok, LAYER1, corpus=texts, n_samples=200, cache=tmp_path)
    assert any("invalid eigensystem" in str(w.message) for w in caught)
    torch.testing.assert_close(e3, evals, rtol=0, atol=0)


def test_reverted_batches_leave_the_preserved_keys(fm, corpus):
    """An independent evaluation edits, applies, scores and reverts each case: the next edit must
    not be constrained by the reverted one."""
    model, tok = fm.model, fm.tokenizer
    r1, r2 = fm.edit_requests(2, seed=13)
    ae = AlphaEdit(HP, corpus=corpus)
    p1 = ae.edit(model, tok, [r1])
    p1.apply(model)
    p1.revert(model)
    p2 = ae.edit(model, tok, [r2])
    assert ae.n_preserved_edits == 1 and ae.preserved_keys[LAYER1].shape == (384, 1)
    alone = AlphaEdit(HP, corpus=corpus).edit(model, tok, [r2])
    torch.testing.assert_close(p2.dense(f"{LAYER1}.weight"), alone.dense(f"{LAYER1}.weight"),
                               rtol=0, atol=0)
    # Weights changed by something else since (an edit it was told not to remember): the keys
    # are kept, with a warning.
    p2.apply(model)
    p3 = ae.edit(model, tok, [r1], remember=False)
    p3.apply(model)
    try:
        with pytest.warns(UserWarning, match="neither the weights"):
            ae.edit(model, tok, [r1], remember=False)
        assert ae.n_preserved_edits == 1
    finally:
        p3.revert(model)
        p2.revert(model)


def test_replaced_hparams_change_the_projector(fm, corpus):
    ae = AlphaEdit(HP, corpus=corpus)
    small = ae.projector(fm.model, fm.tokenizer, LAYER1)
    ae.hparams = AlphaEditHyperParams.from_dict({**HP, "nullspace_threshold": 1e-2})
    large = ae.projector(fm.model, fm.tokenizer, LAYER1)
    assert round(float(torch.trace(large))) > round(float(torch.trace(small))) > 0
