"""Issue 18, item 9: a batch editor (MEMIT, FT, FT+L, MEND, KE) refuses two requests with the
same subject and prompt but different targets, naming both, and leaves the model unchanged;
exact duplicates are edited once (with a warning), so the patch equals the one-request patch."""

from __future__ import annotations

import pytest
import torch
from testutils import GPT2_TOKENIZER, tiny_gpt2

from lightning_rome.editing import (
    KE,
    MEND,
    KEHyperParams,
    KENetwork,
    MENDHyperParams,
    MENDNetwork,
)
from lightning_rome.models import load_tokenizer
from lightning_rome.requests import EditRequest, check_batch

from .helpers import EDITORS, assert_unchanged, snapshot

A = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar", case_id=1)
B = EditRequest("{} plays the", "Toko Yasuda", "violin", "guitar", case_id=2)
OTHER = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris", case_id=3)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER)


def _editor(name, model, tok):
    torch.manual_seed(1)
    if name == "mend":
        return MEND(MENDNetwork.for_model(model, MENDHyperParams(layers=[1], rank=4,
                                                                       edit_lr=0.5)))
    if name == "ke":
        return KE(KENetwork.for_model(
            model, KEHyperParams(layers=[1], lstm_hidden=8, hidden=16), tok))
    return EDITORS[name]()


BATCH = ["memit", "ft", "ft-l", "mend", "ke"]


@pytest.mark.parametrize("name", BATCH)
def test_conflicting_targets_are_refused_naming_both(name, tok):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"conflicting.*case_id=1.*'piano'.*case_id=2"
                                         r".*'violin'"):
        _editor(name, model, tok).edit(model, tok, [A, OTHER, B])
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["memit", "ft", "mend"])
def test_exact_duplicates_are_edited_once(name, tok):
    model = tiny_gpt2()
    one = _editor(name, model, tok).edit(model, tok, [A, OTHER])
    dup = EditRequest(A.prompt, A.subject, A.target_new, A.target_true, case_id=9)
    with pytest.warns(UserWarning, match=r"edited once.*case_id=9.*repeats #0 \(case_id=1\)"):
        two = _editor(name, model, tok).edit(model, tok, [A, OTHER, dup])
    assert two.names == one.names
    for n in one.names:
        torch.testing.assert_close(two.dense(n).detach(), one.dense(n).detach(), rtol=0, atol=0)


def test_check_batch_keeps_order_and_different_facts():
    assert check_batch([A, OTHER]) == [A, OTHER]
    # Same subject, another prompt: another fact, not a conflict.
    other_prompt = EditRequest("{} plays", "Toko Yasuda", "violin")
    assert check_batch([A, other_prompt]) == [A, other_prompt]
    # target_true disagreeing is a conflict too (KE conditions on it).
    with pytest.raises(ValueError, match="conflicting"):
        check_batch([A, EditRequest(A.prompt, A.subject, A.target_new, "cello")])
