"""Issue 18, item 3: every editor edits in eval mode (no dropout) and restores each module's own
training flag afterwards, also when it raises."""

from __future__ import annotations

import pytest
import torch
from testutils import GPT2_TOKENIZER
from torch import nn

from lightning_rome.editing import (
    KE,
    MEND,
    KEHyperParams,
    KENetwork,
    MENDHyperParams,
    MENDNetwork,
)
from lightning_rome.models import load_tokenizer
from lightning_rome.models.modes import eval_mode
from lightning_rome.requests import EditRequest

from .helpers import EDITORS

REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER)


def dropout_gpt2() -> nn.Module:
    """A random tiny GPT-2 with dropout 0.5 everywhere."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_layer=2, n_embd=32, n_head=2, n_positions=128,
                     resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,
                     bos_token_id=50256, eos_token_id=50256)
    return GPT2LMHeadModel(cfg)


def _mend(model, tok):
    torch.manual_seed(1)
    return MEND(MENDNetwork.for_model(model, MENDHyperParams(layers=[1], rank=4,
                                                                   edit_lr=0.5)))


def _ke(model, tok):
    torch.manual_seed(1)
    hp = KEHyperParams(layers=[1], lstm_hidden=8, hidden=16)
    return KE(KENetwork.for_model(model, hp, tok))


def _editor(name, model, tok):
    if name == "mend":
        return _mend(model, tok)
    if name == "ke":
        return _ke(model, tok)
    return EDITORS[name]()


NAMES = [*EDITORS, "mend", "ke"]


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("name", NAMES)
def test_patch_in_train_mode_equals_patch_in_eval_mode(name, tok):
    """Dropout 0.5 everywhere: an editor given a model in train() mode returns the same patch as
    in eval() mode (before the fix, two seeds gave different patches), and every module's flag,
    in a mixed-mode model, is what it was."""
    model = dropout_gpt2().eval()
    torch.manual_seed(0)
    ref = _editor(name, model, tok).edit(model, tok, REQ)
    model.train()
    model.transformer.h[0].eval()  # a mixed-mode model
    model.lm_head.eval()
    flags = _flags(model)
    assert any(flags.values()) and not all(flags.values())
    torch.manual_seed(123)  # another dropout draw, if dropout were on
    got = _editor(name, model, tok).edit(model, tok, REQ)
    assert _flags(model) == flags
    assert got.names == ref.names
    for n in ref.names:
        a, b = ref.dense(n).detach(), got.dense(n).detach()
        assert a.abs().max() > 0, n
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_flags_restored_when_the_editor_raises(name, tok, monkeypatch):
    """An error in the middle of the edit still restores each module's own flag."""
    model = dropout_gpt2().train()
    model.transformer.h[1].mlp.eval()
    flags = _flags(model)
    editor = _editor(name, model, tok)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    # Every editor runs the model through the one hook routine or a forward pass.
    monkeypatch.setattr(type(model.transformer), "forward", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.edit(model, tok, REQ)
    assert _flags(model) == flags


def test_eval_mode_helper_restores_mixed_flags_and_nests():
    model = dropout_gpt2().train()
    model.transformer.h[0].eval()
    flags = _flags(model)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        with eval_mode(model):
            pass
        assert not any(m.training for m in model.modules())
    assert _flags(model) == flags
    with pytest.raises(KeyError), eval_mode(model):
        raise KeyError("x")
    assert _flags(model) == flags
