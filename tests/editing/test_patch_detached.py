"""Every editor returns patches whose tensors carry no autograd history (issue 17, item 5): a
patch kept by the caller must not pin the graph of the edit, nor let gradients flow into it."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing import FT, FTL, KN, MEMIT, ROME
from lightning_rome.editing.hypernet import (
    KE,
    MEND,
    KEHyperParams,
    KENetwork,
    MENDHyperParams,
    MENDNetwork,
)
from lightning_rome.patches import LowRankDelta

CONTEXTS = ["{}", "Some text. {}"]
REQ = EditRequest("{} plays the", "Toko Yasuda", "piano")


def _C(model, tok, name):
    d = model.get_submodule(name).weight.shape[0]  # Conv1D weight is (in, out)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (4 * d)


EDITORS = {
    **{f"rome-{mode}": (lambda mode=mode: lambda m, t: ROME(
        {"layer": 1, "v_num_grad_steps": 3, "context_templates": CONTEXTS, "key_mode": mode},
        second_moment=_C)) for mode in ("reference", "r-rome", "paper")},
    "memit": lambda: lambda m, t: MEMIT({"layers": [0, 1], "v_num_grad_steps": 3,
                                         "context_templates": CONTEXTS}, second_moment=_C),
    "ft": lambda: lambda m, t: FT({"layers": [1], "num_steps": 2}),
    "ft-l": lambda: lambda m, t: FTL({"layers": [1], "num_steps": 2, "norm_constraint": 1e-3}),
    "kn": lambda: lambda m, t: KN({"layers": [1], "steps": 2, "batch_size": 2}),
    "mend": lambda: lambda m, t: MEND(MENDNetwork.for_model(
        m, MENDHyperParams(layers=[0, 1], rank=4, edit_lr=0.5, positions="all"))),
    "ke": lambda: lambda m, t: KE(KENetwork.for_model(
        m, KEHyperParams(layers=[0, 1], lstm_hidden=8, hidden=16, positions="all"), t)),
}


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_patch_tensors_have_no_autograd_history(name, gpt2_tokenizer):
    model = tiny_gpt2()
    editor = EDITORS[name]()(model, gpt2_tokenizer)
    patch = editor.edit(model, gpt2_tokenizer, [REQ])
    tensors = []
    for d in patch.deltas.values():
        tensors += [d.left, d.right] if isinstance(d, LowRankDelta) else [d]
    assert tensors
    for t in tensors:
        assert not t.requires_grad, f"{name}: a patch tensor requires grad"
        assert t.grad_fn is None, f"{name}: a patch tensor has a grad_fn"
