"""Issue 18, item 12: an update that the weights' dtype cannot represent (it would leave (almost)
every entry as it was) is refused with a message, instead of a patch that changes nothing."""

from __future__ import annotations

import pytest
import torch
from testutils import GPT2_TOKENIZER, tiny_gpt2

from lightning_rome.editing import MEMIT, ROME
from lightning_rome.models import load_tokenizer
from lightning_rome.models.precision import UnderflowError, check_update_representable
from lightning_rome.patches import LowRankDelta
from lightning_rome.requests import EditRequest

from .helpers import CONTEXTS, EDITORS, assert_unchanged, second_moment, snapshot

REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER)


@pytest.mark.parametrize(("name", "dtype"), [("rome", torch.float16), ("memit", torch.float16),
                                           ("memit", torch.bfloat16)])
def test_underflowing_edit_is_refused(name, dtype, tok):
    """A tiny fp16 GPT-2 (and MEMIT's small per-layer updates at the published λ = 20000 in
    bf16): the patch was ~1e-9, or applying it changed < 1% of the entries. Now refused,
    naming the weight and the dtype, with the model unchanged."""
    model = tiny_gpt2().to(dtype)
    before = snapshot(model)
    # ROME in paper mode: its Λ = δ/(uᵀk̄) on this tiny fp16 model is ~1e-9 (reference mode's
    # normalised u gives a representable update; see the bf16 test below).
    editor = ROME({"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS,
                   "key_mode": "paper"}, second_moment=second_moment) if name == "rome" else MEMIT(
        {"layers": [0, 1], "v_num_grad_steps": 2, "context_templates": CONTEXTS},
        second_moment=second_moment)
    with pytest.raises(UnderflowError, match=rf"mlp\.c_proj\.weight.*{str(dtype)[6:]}.*float32"):
        editor.edit(model, tok, REQ)
    assert_unchanged(model, before)


def test_bf16_edit_that_fits_goes_through_and_changes_the_weights(tok):
    model = tiny_gpt2().to(torch.bfloat16)
    patch = EDITORS["rome"]().edit(model, tok, REQ)
    before = snapshot(model)
    patch.apply(model)
    (n,) = patch.names
    assert (model.get_parameter(n) != before[n]).float().mean() > 0.9


def test_check_on_a_weight():
    w = torch.nn.Linear(8, 4).to(torch.float16)
    with torch.no_grad():
        w.weight.fill_(1.0)
    model = torch.nn.Sequential(w)
    small = LowRankDelta(torch.full((4, 1), 1e-5), torch.ones(1, 8))  # fp16 ulp at 1 is 1e-3
    with pytest.raises(UnderflowError, match=r"0\.weight.*float16.*0 of 32"):
        check_update_representable(model, {"0.weight": small}, "TEST")
    check_update_representable(model, {"0.weight": LowRankDelta(torch.full((4, 1), 1e-2),
                                                                torch.ones(1, 8))}, "TEST")
    check_update_representable(model, {"0.weight": torch.zeros(4, 8)}, "TEST")  # empty: not ours
    # float32 at 1.0 resolves 1e-5
    model32 = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with torch.no_grad():
        model32[0].weight.fill_(1.0)
    check_update_representable(model32, {"0.weight": small}, "TEST")


def test_underflowing_alphaedit_is_refused(tok):
    """AlphaEdit checks its update like ROME and MEMIT: with a large α the fp16 update rounds
    away; refused, naming the weight, with the model unchanged."""
    from lightning_rome.editing import AlphaEdit

    model = tiny_gpt2().to(torch.float16)
    before = snapshot(model)
    # τ above every eigenvalue of the synthetic C: P = I (the null space is everything)
    editor = AlphaEdit({"layers": [0, 1], "v_num_grad_steps": 2, "context_templates": CONTEXTS,
                        "nullspace_threshold": 1e3, "l2_weight": 1e6},
                       second_moment=second_moment)
    with pytest.raises(UnderflowError, match=r"AlphaEdit: .*mlp\.c_proj\.weight.*float16"):
        editor.edit(model, tok, REQ)
    assert_unchanged(model, before)
    assert editor.n_preserved_edits == 0


@pytest.mark.parametrize("lr", [1e-7])
def test_ft_steps_that_round_away_in_bf16_are_refused(lr, tok):
    """FT tunes the weights in place: in bfloat16 at a small learning rate every Adam step
    (≈ lr) is far below the weights' resolution, so the tuned weights equal the originals and
    the patch would be all zeros. Refused, naming the weight and the dtype; model unchanged."""
    from lightning_rome.editing import FT

    model = tiny_gpt2().to(torch.bfloat16)
    before = snapshot(model)
    editor = FT({"layers": [1], "num_steps": 3, "lr": lr})
    with pytest.raises(UnderflowError, match=r"ft: .*mlp\.c_proj\.weight.*bfloat16"):
        editor.edit(model, tok, REQ)
    assert_unchanged(model, before)


def test_ft_in_bf16_with_a_usable_learning_rate_goes_through(tok):
    from lightning_rome.editing import FT

    model = tiny_gpt2().to(torch.bfloat16)
    patch = FT({"layers": [1], "num_steps": 3, "lr": 5e-2}).edit(model, tok, REQ)
    (d,) = [patch.deltas[n] for n in patch.names]
    d = d.dense() if hasattr(d, "dense") else d
    assert (d != 0).float().mean() > 0.5
