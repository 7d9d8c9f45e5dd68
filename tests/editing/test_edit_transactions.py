"""Every editor that applies edits in turn (ROME and KN over requests, MEMIT and AlphaEdit over
layers, MEMIT over chunks, the edit callbacks across ranks) runs them in one
:class:`~lightning_rome.patches.EditTransaction`: an error in the k-th edit leaves the model
bit-identical to before, and success leaves every edit applied (``apply=True``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing import KN, MEMIT, ROME, AlphaEdit
from lightning_rome.editing import alphaedit as alphaedit_module
from lightning_rome.editing import memit as memit_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "callbacks"))

CONTEXTS = ["{}", "Some text. {}"]
REQS = [EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar"),
        EditRequest("{} lives in", "Varnok Telimar", "Paris", target_true="Rome"),
        EditRequest("The job of {} is", "Ana Lu", "doctor", target_true="nurse")]


def C_of(d: int = 128):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    C = A @ A.T / (4 * d)
    return lambda m, t, n: C


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, n_embd=32, seed=2)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.dtype == before[n].dtype, n


def rome():
    return ROME({"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS},
                second_moment=C_of())


def memit():
    return MEMIT({"layers": [1, 2], "v_num_grad_steps": 2, "context_templates": CONTEXTS},
                 second_moment=C_of())


def kn():
    return KN({"steps": 2, "batch_size": 2, "layers": [1]})


def fail_on_call(monkeypatch, owner, name, k, model, before, seen):
    """Make ``owner.name`` raise on its k-th call (1-based), recording whether the model held
    the earlier edits at that moment (the edits run in turn on the edited model)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            seen.append(any(not torch.equal(p, before[n]) for n, p in model.named_parameters()))
            raise RuntimeError(f"injected failure in edit {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


SITES = {
    # editor factory, (object, attribute) whose k-th call is the k-th edit, the edits in all
    "rome": (rome, (ROME, "edit_one"), 3),
    "kn": (kn, (KN, "edit_one"), 3),
    "memit-layers": (memit, (memit_module, "memit_update"), 2),
    "memit-chunks": (memit, (MEMIT, "_edit_batch"), 3),
}


@pytest.mark.parametrize("site", list(SITES))
def test_error_in_the_kth_edit_leaves_the_model_bit_identical(site, model, gpt2_tokenizer,
                                                               monkeypatch):
    make, (owner, attr), n = SITES[site]
    kwargs = {"chunk_size": 1} if site == "memit-chunks" else {}
    reqs = REQS[:1] if site == "memit-layers" else REQS
    before = snapshot(model)
    for k in range(2, n + 1):  # the first k-1 edits were applied when the k-th fails
        seen: list[bool] = []
        with monkeypatch.context() as mp:
            fail_on_call(mp, owner, attr, k, model, before, seen)
            with pytest.raises(RuntimeError, match=f"injected failure in edit {k}"):
                make().edit(model, gpt2_tokenizer, reqs, apply=True, **kwargs)
        assert seen == [True], "the k-th edit should run on the model holding the earlier ones"
        assert_bit_identical(model, before)


@pytest.mark.parametrize("site", list(SITES))
def test_success_leaves_every_edit_applied(site, model, gpt2_tokenizer):
    make, _, _ = SITES[site]
    kwargs = {"chunk_size": 1} if site == "memit-chunks" else {}
    reqs = REQS[:1] if site == "memit-layers" else REQS
    before = snapshot(model)
    patch = make().edit(model, gpt2_tokenizer, reqs, **kwargs)  # apply=False: model restored
    assert_bit_identical(model, before)
    total = make().edit(model, gpt2_tokenizer, reqs, apply=True, **kwargs)
    try:
        assert total.is_applied(model)
        assert [r.subject for r in total.requests] == [r.subject for r in reqs]
        for name in total.names:  # the weights hold every edit: original + composed delta
            w = model.get_parameter(name)
            view = w.T if "c_proj" in name or "c_fc" in name else w
            want = before[name].T if view is not w else before[name]
            torch.testing.assert_close(view.double(), want.double() + total.dense(
                name, torch.float64), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(total.dense(name), patch.dense(name), rtol=1e-4,
                                       atol=1e-6)
    finally:
        total.revert(model)
    assert_bit_identical(model, before)


def test_alphaedit_error_in_the_second_layer_leaves_the_model_bit_identical(monkeypatch,
                                                                            tmp_path):
    from lightning_rome.testing import get_fact_model

    fm = get_fact_model()
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path))  # its statistics go there
    ae = AlphaEdit({"layers": [0, 1], "fact_token": "last", "v_num_grad_steps": 2,
                    "context_template_lengths": [[6, 1]], "context_template_starts": None,
                    "mom2_n_samples": 500, "nullspace_threshold": 1e-3},
                   corpus=list(fm.kb.text_corpus()))
    reqs = fm.edit_requests(2, seed=11)
    before = snapshot(fm.model)
    seen: list[bool] = []
    fail_on_call(monkeypatch, alphaedit_module, "alphaedit_update", 2, fm.model, before, seen)
    with pytest.raises(RuntimeError, match="injected failure in edit 2"):
        ae.edit(fm.model, fm.tokenizer, reqs, apply=True)
    assert seen == [True]
    assert_bit_identical(fm.model, before)
    assert ae.state_dict()["keys"] == {}  # K_p is not extended by a failed edit


class _FakeStrategy:
    @staticmethod
    def reduce_boolean_decision(decision, all=True):
        return decision

    @staticmethod
    def broadcast(obj, src=0):
        return obj


class _TwoRanks:
    """Rank 0 of a two-rank Trainer, as much of it as ``EditorCallback._apply`` reads."""

    world_size = 2
    is_global_zero = True
    global_rank = 0
    logger = None
    global_step = 0
    strategy = _FakeStrategy()


class _Module:
    def __init__(self, model, tok):
        self.model, self.tokenizer = model, tok


def test_callback_reverts_when_another_rank_fails_to_apply(model, gpt2_tokenizer, monkeypatch):
    """Rank 0 applied the patch; rank 1 reports that its apply failed: rank 0 reverts, every
    bit, and raises the same error."""
    from lightning_rome.callbacks import ROMECallback, edit

    cb = ROMECallback(REQS[:1], {"layer": 1, "v_num_grad_steps": 2,
                                 "context_templates": CONTEXTS}, second_moment=C_of(),
                      log_efficacy=False)
    before = snapshot(model)
    gathers = []
    held = []

    def all_gather(trainer, obj):
        gathers.append(obj)
        if len(gathers) == 2:  # after applying: rank 1 failed
            held.append(any(not torch.equal(p, before[n]) for n, p in model.named_parameters()))
            return [obj, "PatchMismatchError: injected on rank 1"]
        return [obj, None]

    monkeypatch.setattr(edit, "_all_gather_objects", all_gather)
    with pytest.raises(RuntimeError, match="failed on rank 1: PatchMismatchError"):
        cb._apply(_TwoRanks(), _Module(model, gpt2_tokenizer))
    assert held == [True]  # rank 0 had applied it
    assert_bit_identical(model, before)
    assert not cb.applied
