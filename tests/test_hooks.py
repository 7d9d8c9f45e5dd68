"""module_hooks: records what the model computes, replaces activations with the effect the
algebra predicts, passes gradients, and never leaves a hook behind."""

from __future__ import annotations

import pytest
import torch
from tiny_factories import tiny_model
from torch import nn

from lightning_rome.hooks import first_tensor, module_hooks, replace_positions
from lightning_rome.models import get_layout

FAMILIES = ("gpt2", "llama")


def hook_ids(model: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook registered on ``model``'s modules."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks")
            for key in getattr(m, kind)}


def no_hooks_left(model: nn.Module) -> bool:
    """No hook other than those transformers installs itself (it keeps persistent
    output-capturing hooks for ``output_hidden_states``, registered at the first such call)."""
    return all(getattr(h, "__qualname__", "").startswith("install_output_capuring_hook")
               or "output_capturing" in getattr(h, "__qualname__", "")
               for m in model.modules()
               for kind in ("_forward_hooks", "_forward_pre_hooks")
               for h in getattr(m, kind).values())


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    # A wider init than the default makes logits (and their changes) far from uniform.
    return tiny_model(request.param, vocab_size=100, initializer_range=0.2)


IDS = torch.tensor([[5, 17, 3, 99, 42, 8], [7, 7, 1, 2, 3, 4]])  # (B, T)


@torch.no_grad()
def test_records_equal_hidden_states_and_inputs(model):
    layout = get_layout(model)
    names = [layout.block(0), layout.block(1), layout.name("mlp_out", 1),
             layout.name("final_norm")]
    with module_hooks(model, names, retain_input=True, retain_output=True) as rec:
        out = model(IDS, output_hidden_states=True)
    assert no_hooks_left(model)
    h0, h1 = rec[layout.block(0)], rec[layout.block(1)]
    assert h0.output.shape == (2, 6, 32)
    assert torch.equal(h0.output, out.hidden_states[1])  # residual stream after block 0
    assert torch.equal(h1.input, h0.output)  # block 1 reads block 0's output
    assert torch.equal(rec[layout.name("final_norm")].input, h1.output)
    # An independent computation of the last block's MLP output projection.
    w_out = layout.module(model, "mlp_out", 1)
    k = rec[layout.name("mlp_out", 1)].input  # (B, T, d_ff)
    torch.testing.assert_close(rec[layout.name("mlp_out", 1)].output, w_out(k), rtol=0, atol=0)
    # The latest forward pass wins.
    with module_hooks(model, layout.block(0), retain_output=True) as rec2:  # a single name
        model(IDS)
        model(IDS[:1, :3])
    assert rec2[layout.block(0)].output.shape == (1, 3, 32)
    # Causal: the prefix's states are those of the longer run.
    torch.testing.assert_close(rec2[layout.block(0)].output, h0.output[:1, :3], rtol=1e-5,
                               atol=1e-5)
    assert no_hooks_left(model)


@torch.no_grad()
def test_restoring_clean_state_restores_clean_logits(model):
    """Causal-tracing algebra: corrupt the last token, patch block 0's output at that position
    with the clean run's value, and every logit is the clean one again."""
    layout = get_layout(model)
    clean, corrupt = IDS[:1], IDS[:1].clone()
    corrupt[0, -1] = 11
    t = IDS.shape[1] - 1
    with module_hooks(model, [layout.block(0)], retain_output=True) as rec:
        clean_logits = model(clean).logits  # (1, T, V)
    h_clean = rec[layout.block(0)].output[0, t]  # (d,)
    corrupt_logits = model(corrupt).logits
    assert (corrupt_logits[0, -1] - clean_logits[0, -1]).abs().max() > 1e-2
    with module_hooks(model, [layout.block(0)], retain_output=True,
                      edit_output=replace_positions(t, h_clean)) as rec:
        restored = model(corrupt).logits
    torch.testing.assert_close(restored, clean_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(rec[layout.block(0)].output[0, t], h_clean)  # recorded after the edit
    # Restoring the final block's output at the last position restores the last logits only.
    with module_hooks(model, [layout.block(1)], retain_output=True) as rec:
        model(clean)
    corrupt2 = clean.clone()
    corrupt2[0, 1] = 11  # corrupt an earlier token: every later position is affected
    with module_hooks(model, [layout.block(1)],
                      edit_output=replace_positions([t], rec[layout.block(1)].output[0, t])):
        patched = model(corrupt2).logits
    torch.testing.assert_close(patched[0, -1], clean_logits[0, -1], rtol=1e-6, atol=1e-6)
    assert (patched[0, 1:-1] - clean_logits[0, 1:-1]).abs().amax(-1).min() > 1e-3
    assert no_hooks_left(model)


@torch.no_grad()
def test_zero_vector_changes_only_later_logits(model):
    layout = get_layout(model)
    base = model(IDS).logits  # (B, T, V)
    t = 2
    with module_hooks(model, [layout.block(0)], retain_output=True,
                      edit_output=replace_positions(t, torch.zeros(32), batch=[1])) as rec:
        edited = model(IDS).logits
    assert torch.equal(rec[layout.block(0)].output[1, t], torch.zeros(32))
    assert torch.equal(edited[0], base[0])  # row 0 is not in the batch
    torch.testing.assert_close(edited[1, :t], base[1, :t], rtol=0, atol=1e-6)  # causal
    assert (edited[1, t:] - base[1, t:]).abs().amax(-1).min() > 1e-3


@torch.no_grad()
def test_replace_positions_per_row(model):
    layout = get_layout(model)
    ids = torch.cat([IDS, IDS[:1]])  # (3, T)
    with module_hooks(model, [layout.block(0)], retain_output=True) as rec:
        model(ids)
    before = rec[layout.block(0)].output.clone()  # (3, T, d)
    values = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # (n, d)
    with module_hooks(model, [layout.block(0)], retain_output=True,
                      edit_output=replace_positions([1, 4], values, batch=[0, 2])) as rec:
        model(ids)
    after = rec[layout.block(0)].output
    expected = before.clone()
    expected[0, 1], expected[2, 4] = values[0], values[1]
    assert torch.equal(after, expected)


def test_gradient_flows_to_replacement_values(model):
    """d logit / d v for a value written by replace_positions equals the finite difference."""
    layout = get_layout(model)
    m64 = model.double()
    try:
        ids, t = IDS[:1], 2
        with torch.no_grad(), module_hooks(m64, [layout.block(0)], retain_output=True) as rec:
            m64(ids)
        v = rec[layout.block(0)].output[0, t].clone().requires_grad_(True)  # (d,)

        def score(value: torch.Tensor) -> torch.Tensor:
            with module_hooks(m64, [layout.block(0)],
                              edit_output=replace_positions(t, value)):
                return m64(ids).logits[0, -1].log_softmax(-1)[3]

        (grad,) = torch.autograd.grad(score(v), v)
        assert grad.abs().sum() > 0
        u = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        # Llama's RMSNorm computes in float32 even in a float64 model, so the step is large and
        # the tolerance loose (central differences: error O(eps²)).
        eps = 1e-2
        with torch.no_grad():
            fd = (score(v + eps * u) - score(v - eps * u)) / (2 * eps)
        torch.testing.assert_close(grad @ u, fd, rtol=1e-3, atol=0)
        # detach=False keeps recorded tensors in the graph: the same gradient reaches them.
        with module_hooks(m64, [layout.block(0)], retain_output=True, detach=False) as rec:
            out = m64(ids).logits[0, -1].log_softmax(-1)[3]
        h = rec[layout.block(0)].output
        assert h.requires_grad
        (g_h,) = torch.autograd.grad(out, h)
        torch.testing.assert_close(g_h[0, t], grad, rtol=1e-9, atol=1e-12)
        # The default detach=True records no graph.
        with module_hooks(m64, [layout.block(0)], retain_output=True) as rec:
            m64(ids)
        assert not rec[layout.block(0)].output.requires_grad
    finally:
        model.float()
    assert no_hooks_left(model)


@torch.no_grad()
def test_edit_input_replaces_module_input(model):
    """Feeding the clean last block output into the final norm of a corrupted run gives the
    clean logits; zeroing W_out's input leaves only its bias."""
    layout = get_layout(model)
    clean, corrupt = IDS[:1], IDS[:1].flip(-1)
    with module_hooks(model, [layout.block(1)], retain_output=True) as rec:
        clean_logits = model(clean).logits
    h = rec[layout.block(1)].output
    norm = layout.name("final_norm")
    with module_hooks(model, [norm], retain_input=True, edit_input=lambda x, n: h) as rec:
        logits = model(corrupt).logits
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)
    assert torch.equal(rec[norm].input, h)
    w_out = layout.name("mlp_out", 0)
    with module_hooks(model, [w_out], retain_output=True,
                      edit_input={w_out: lambda x, n: torch.zeros_like(x)}) as rec:
        model(clean)
    bias = layout.module(model, "mlp_out", 0).bias
    expected = torch.zeros(1, 6, 32) if bias is None else bias.expand(1, 6, 32)
    assert torch.equal(rec[w_out].output, expected)


class _KwargsModel(nn.Module):
    """Calls its child with keyword arguments only, then changes the child's output in place."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.inner(input=x)
        kept = y.clone()
        y.add_(100.0)  # an in-place change after the hooked module ran
        return kept, y


@torch.no_grad()
def test_keyword_inputs_and_clone():
    toy = _KwargsModel()
    x = torch.randn(2, 4)
    with module_hooks(toy, ["inner"], retain_input=True, retain_output=True) as rec:
        kept, _ = toy(x)
    assert torch.equal(rec["inner"].input, x)
    assert torch.equal(rec["inner"].output, kept + 100.0)  # an alias sees the in-place change
    with module_hooks(toy, ["inner"], retain_output=True, clone=True) as rec:
        kept, _ = toy(x)
    assert torch.equal(rec["inner"].output, kept)  # a copy does not
    with module_hooks(toy, ["inner"], edit_input=lambda t, n: 2 * t) as rec:
        kept, _ = toy(x)
    torch.testing.assert_close(kept, toy.inner(2 * x))
    assert no_hooks_left(toy)


def test_tuple_outputs():
    assert torch.equal(first_tensor((torch.ones(2), None)), torch.ones(2))
    with pytest.raises(TypeError, match="dict"):
        first_tensor({"a": 1})

    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, "aux"

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)

    outer = Outer()
    with module_hooks(outer, ["pair"], retain_output=True,
                      edit_output=lambda t, n: t * 10) as rec:
        out = outer(torch.ones(3))
    assert isinstance(out, tuple) and out[1] == "aux"
    assert torch.equal(out[0], torch.full((3,), 20.0))
    assert torch.equal(rec["pair"].output, out[0])


def test_hooks_removed_on_exception_in_body(model):
    layout = get_layout(model)
    names = [layout.block(0), layout.name("mlp_out", 1)]
    before = hook_ids(model)
    with pytest.raises(RuntimeError, match="boom"), module_hooks(
            model, names, retain_input=True, retain_output=True,
            edit_output=lambda t, n: t, edit_input=lambda t, n: t):
        assert len(hook_ids(model) - before) == 4  # a pre- and a post-hook per module
        assert not no_hooks_left(model)
        raise RuntimeError("boom")
    assert hook_ids(model) == before
    assert no_hooks_left(model)


def test_hooks_removed_when_edit_fn_raises(model):
    layout = get_layout(model)

    def bad(t, n):
        raise ValueError(f"bad edit at {n}")

    with pytest.raises(ValueError, match="bad edit at"), module_hooks(
            model, [layout.block(1)], edit_output=bad):
        model(IDS)
    assert no_hooks_left(model)


def test_invalid_name_hooks_nothing(model):
    layout = get_layout(model)
    with pytest.raises(AttributeError), module_hooks(
            model, [layout.block(0), "transformer.nope.3"], retain_output=True):
        pytest.fail("the body must not run")
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match=r"not hooked: \['x.y'\]"), module_hooks(
            model, [layout.block(0)], edit_output={"x.y": lambda t, n: t}):
        pytest.fail("the body must not run")
    assert no_hooks_left(model)


@torch.no_grad()
def test_nested_contexts_see_outer_edits(model):
    """An inner context registered later sees what an outer context's edit wrote (the order
    causal tracing relies on: corrupt in the outer context, record or restore in the inner)."""
    layout = get_layout(model)
    embed = layout.name("embed")
    noise = torch.full((32,), 3.0)
    with module_hooks(model, [embed], edit_output=replace_positions(1, noise)), module_hooks(
            model, [embed], retain_output=True) as inner:
        model(IDS)
    assert torch.equal(inner[embed].output[:, 1], noise.expand(2, 32))
    assert no_hooks_left(model)
