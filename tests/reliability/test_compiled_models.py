"""``torch.compile`` wrappers: editors and patches see through ``OptimizedModule`` to the module
it wraps (``lightning_rome.utils.modules.unwrap_model``), so editing the wrapper gives the patch of
the module, and applying on one and reverting on the other is bit-exact. Only the wrapper object is
constructed: no compiled code runs."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.callbacks.edit import find_model
from lightning_rome.utils.modules import unwrap_model

from .helpers import EDITORS, assert_unchanged, snapshot

REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", target_true="guitar")


def test_unwrap_model_returns_the_inner_module():
    model = tiny_gpt2()
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert unwrap_model(model) is model


@pytest.mark.parametrize("name", ["rome", "ft"])
def test_editing_the_wrapper_is_editing_the_module(name, gpt2_tokenizer):
    model = tiny_gpt2()
    before = snapshot(model)
    compiled = torch.compile(model)
    ran: list[bool] = []
    # A forward pass through the wrapper would compile; the editor must use the inner module.
    compiled.forward = lambda *a, **k: ran.append(True)  # type: ignore[method-assign]
    from_wrapper = EDITORS[name]().edit(compiled, gpt2_tokenizer, [REQ])
    from_module = EDITORS[name]().edit(model, gpt2_tokenizer, [REQ])
    assert not ran
    assert from_wrapper.names == from_module.names
    for n in from_module.names:
        assert torch.equal(from_wrapper.dense(n), from_module.dense(n)), n
    assert_unchanged(model, before)
    from_wrapper.apply(compiled)
    from_wrapper.revert(model)
    assert_unchanged(model, before)


def test_find_model_unwraps_a_compiled_model(gpt2_tokenizer):
    import lightning.pytorch as pl

    class Holder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = tiny_gpt2()
            self.model = torch.compile(self.inner)

    holder = Holder()
    assert find_model(holder) is holder.inner


def test_model_checksum_of_the_wrapper_is_that_of_the_module():
    from lightning_rome.modules.evaluator import model_checksum

    model = tiny_gpt2()
    assert model_checksum(torch.compile(model)) == model_checksum(model)
