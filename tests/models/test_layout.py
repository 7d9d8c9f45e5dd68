"""ModelLayout: every family's parts exist, have the right shapes, and compute what their names
say (checked against ``output_hidden_states`` and the MLP algebra)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_factories import D_FF, FAMILIES, tiny_model

from lightning_rome.hooks import module_hooks
from lightning_rome.models import (
    LAYOUTS,
    ModelLayout,
    UnknownModelFamilyError,
    canonical_weight,
    get_layout,
)

D, V = 32, 100
GATED = {"llama", "mistral", "qwen2"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param, vocab_size=V)


def test_every_family_has_a_layout():
    assert set(FAMILIES) <= set(LAYOUTS)
    assert {"gpt2", "gptj", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "phi"} <= set(
        LAYOUTS)


def test_layout_parts_exist_with_expected_shapes(family_model):
    family, model = family_model
    layout = get_layout(model)
    assert layout.family == family == model.config.model_type
    assert layout.n_layers(model) == 2
    d_ff = D_FF[family]
    for layer in (0, 1):
        assert tuple(canonical_weight(layout.module(model, "mlp_out", layer)).shape) == (D, d_ff)
        assert tuple(canonical_weight(layout.module(model, "mlp_in", layer)).shape) == (d_ff, D)
        assert tuple(canonical_weight(layout.module(model, "attn_out", layer)).shape) == (D, D)
        assert layout.module(model, "block", layer) is model.get_submodule(layout.block(layer))
        for part in ("mlp", "attn"):
            layout.module(model, part, layer)  # exists
    assert tuple(layout.module(model, "embed").weight.shape) == (V, D)
    assert tuple(layout.module(model, "lm_head").weight.shape) == (V, D)
    assert tuple(layout.module(model, "final_norm").weight.shape) == (D,)
    assert layout.module(model, "embed") is model.get_input_embeddings()
    assert layout.module(model, "lm_head") is model.get_output_embeddings()
    # The blocks container holds exactly the blocks.
    assert len(model.get_submodule(layout.blocks)) == 2


def test_layout_modules_compute_what_their_names_say(family_model):
    """Block outputs are the residual stream of ``output_hidden_states``; the MLP's output is its
    output projection's; the output projection's input is act(W_in x) (times the gate for gated
    MLPs); the attention's output is its output projection's; logits = lm_head(final_norm(h))."""
    family, model = family_model
    layout = get_layout(model)
    ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    names = [layout.block(0), layout.block(1), layout.name("embed"), layout.name("final_norm"),
             layout.name("lm_head")]
    for layer in (0, 1):
        names += [layout.name(p, layer) for p in ("mlp", "mlp_in", "mlp_out", "attn", "attn_out")]
    with torch.no_grad(), module_hooks(model, names, retain_input=True,
                                       retain_output=True) as rec:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states  # n_layers + 1 tensors (1, T, d)
    torch.testing.assert_close(rec[layout.block(0)].output, hs[1], rtol=0, atol=0)
    torch.testing.assert_close(rec[layout.name("embed")].output,
                               layout.module(model, "embed").weight[ids], rtol=0, atol=0)
    torch.testing.assert_close(rec[layout.name("lm_head")].input,
                               rec[layout.name("final_norm")].output, rtol=0, atol=0)
    torch.testing.assert_close(rec[layout.name("lm_head")].output, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(rec[layout.name("final_norm")].input, rec[layout.block(1)].output,
                               rtol=0, atol=0)
    for layer in (0, 1):
        mlp = layout.module(model, "mlp", layer)
        m_out = rec[layout.name("mlp_out", layer)]
        torch.testing.assert_close(rec[layout.name("mlp", layer)].output, m_out.output,
                                   rtol=0, atol=0)
        torch.testing.assert_close(rec[layout.name("attn", layer)].output,
                                   rec[layout.name("attn_out", layer)].output, rtol=0, atol=0)
        x = rec[layout.name("mlp_in", layer)].input  # (1, T, d): the MLP's input
        torch.testing.assert_close(rec[layout.name("mlp", layer)].input, x, rtol=0, atol=0)
        h = rec[layout.name("mlp_in", layer)].output  # (1, T, d_ff)
        if family in GATED:
            k = F.silu(F.linear(x, mlp.gate_proj.weight)) * h  # (1, T, d_ff)
        else:
            act = getattr(mlp, "act", None) or mlp.activation_fn
            k = act(h)  # (1, T, d_ff)
        torch.testing.assert_close(m_out.input, k, rtol=1e-6, atol=1e-6)
        # W_out acts in canonical orientation: m = W_out k + b.
        w = canonical_weight(layout.module(model, "mlp_out", layer))  # (d, d_ff)
        b = layout.module(model, "mlp_out", layer).bias
        expected = k @ w.T + (b if b is not None else 0)  # (1, T, d)
        torch.testing.assert_close(m_out.output, expected, rtol=1e-5, atol=1e-5)


def test_layer_out_of_range_names_the_range():
    model = tiny_model("gpt2", vocab_size=V)
    layout = get_layout(model)
    for bad in (2, -1, 10, True, 1.0):
        with pytest.raises(IndexError, match=r"2 layers \(0\.\.1\)"):
            layout.check_layer(model, bad)
    with pytest.raises(IndexError, match="out of range"):
        layout.module(model, "mlp_out", 2)
    assert layout.check_layer(model, 1) == 1
    assert layout.check_layer(model, np.int64(1)) == 1 and layout.module(model, "mlp", np.int64(0))


def test_layout_names_and_part_errors():
    layout = LAYOUTS["gpt2"]
    assert layout.name("mlp_out", 5) == "transformer.h.5.mlp.c_proj"
    assert layout.name("block", 3) == "transformer.h.3"
    assert layout.name("embed") == "transformer.wte"
    assert LAYOUTS["llama"].name("mlp_out", 0) == "model.layers.0.mlp.down_proj"
    assert LAYOUTS["gptj"].name("mlp_out", 2) == "transformer.h.2.mlp.fc_out"
    assert LAYOUTS["gpt_neox"].name("mlp_in", 1) == "gpt_neox.layers.1.mlp.dense_h_to_4h"
    with pytest.raises(ValueError, match="unknown layout part 'nope'"):
        layout.name("nope", 0)
    with pytest.raises(ValueError, match="unknown layout part 'family'"):
        layout.name("family")
    with pytest.raises(ValueError, match="per layer"):
        layout.name("mlp_out")
    with pytest.raises(ValueError, match="needs a layer"):
        layout.name("block")
    assert set(ModelLayout.parts()) == {"block", "mlp_in", "mlp_out", "mlp", "attn", "attn_out",
                                        "embed", "final_norm", "lm_head"}


def test_unknown_family_names_it_and_lists_the_known_ones():
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="bert")
    with pytest.raises(UnknownModelFamilyError) as info:
        get_layout(fake)
    msg = str(info.value)
    assert "'bert'" in msg
    for family in FAMILIES:
        assert repr(family) in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelFamilyError, match="'t5'"):
        get_layout(tiny_model("gpt2", vocab_size=V), "t5")


def test_user_overrides():
    model = tiny_model("llama", vocab_size=V)
    # A family name.
    assert get_layout(model, "mistral").family == "mistral"
    # A full layout is returned as is (even for an unknown model family).
    custom = ModelLayout(family="mine", blocks="model.layers", mlp_in="a.{}", mlp_out="b.{}",
                         mlp="c.{}", attn="d.{}", attn_out="e.{}", embed="f", final_norm="g",
                         lm_head="h")
    assert get_layout(model, custom) is custom
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="mine")
    assert get_layout(fake, custom) is custom
    # A dict of fields replaces those fields only.
    layout = get_layout(model, {"mlp_out": "model.layers.{}.mlp.up_proj"})
    assert layout.name("mlp_out", 1) == "model.layers.1.mlp.up_proj"
    assert layout.name("mlp_in", 1) == LAYOUTS["llama"].name("mlp_in", 1)
    assert layout.module(model, "mlp_out", 1) is model.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match="'nope'"):
        get_layout(model, {"nope": "x"})


def test_register_layout(monkeypatch):
    monkeypatch.setattr("lightning_rome.models.layout.LAYOUTS", dict(LAYOUTS))
    from lightning_rome.models import layout as layout_module

    new = ModelLayout(family="mine", **{f: getattr(LAYOUTS["llama"], f) for f in (
        "blocks", "mlp_in", "mlp_out", "mlp", "attn", "attn_out", "embed", "final_norm",
        "lm_head")})
    layout_module.register_layout(new)
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="mine")
    assert layout_module.get_layout(fake) is new
    with pytest.raises(ValueError, match="overwrite=True"):
        layout_module.register_layout(new)
    layout_module.register_layout(new, overwrite=True)
    assert "mine" not in LAYOUTS  # only the patched copy was changed


def test_n_layers_falls_back_to_counting_blocks():
    model = tiny_model("gpt_neo", vocab_size=V)
    assert get_layout(model).n_layers(model) == 2
    bare = torch.nn.Module()
    bare.transformer = torch.nn.Module()
    bare.transformer.h = torch.nn.ModuleList([torch.nn.Identity() for _ in range(3)])
    assert LAYOUTS["gpt2"].n_layers(bare) == 3
