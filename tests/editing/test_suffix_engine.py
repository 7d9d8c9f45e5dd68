"""The value optimisation's suffix pass (prefixes before the lookup token computed once) gives the
full pass's numbers: v*, the losses, and so ROME's and MEMIT's updates, on absolute-position
(GPT-2) and rotary (Llama) models, for every fact token, in both of ROME's value modes."""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest
from lightning_rome.editing import MEMIT, ROME
from lightning_rome.editing import suffix as suffix_mod
from lightning_rome.editing.context import optimise_values
from lightning_rome.editing.suffix import SuffixRows

CONTEXTS = ["{}", "Some text here. {}", "Another line of words, longer than that. {}"]
REQUESTS = [
    EditRequest("{} plays the instrument", "Toko Yasuda", "piano"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English language"),
    EditRequest("{}, which is located in", "Eiffel Tower", "Rome"),
]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50257, num_hidden_layers=3, hidden_size=32,
                      intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=50256, eos_token_id=50256)
    return LlamaForCausalLM(cfg).eval()


MODELS = {"gpt2": lambda: tiny_gpt2(n_layer=3, n_embd=32, seed=1), "llama": tiny_llama}
MODULES = {"gpt2": "transformer.h.1.mlp.c_proj", "llama": "model.layers.1.mlp.down_proj"}


def _run(model, tok, family, engine, **kw):
    torch.manual_seed(0)
    return optimise_values(model, tok, REQUESTS, MODULES[family], CONTEXTS, num_steps=6,
                           lr=0.5, clamp_norm_factor=10.0, early_stop_loss=0.0,
                           engine=engine, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fact_token", ["subject_last", "subject_first", "last"])
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_suffix_pass_gives_the_full_pass_values(gpt2_tokenizer, family, fact_token, mode):
    model = MODELS[family]()
    full = _run(model, gpt2_tokenizer, family, "full", fact_token=fact_token, mode=mode)
    fast = _run(model, gpt2_tokenizer, family, "suffix", fact_token=fact_token, mode=mode)
    assert fast.steps == full.steps == 6
    torch.testing.assert_close(fast.v_init, full.v_init, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.v_star, full.v_star, rtol=1e-5, atol=1e-6)
    assert fast.losses == pytest.approx(full.losses, rel=1e-5)
    # δ moved far from 0: the comparison covers the optimisation, not just its start.
    assert float((full.v_star - full.v_init).norm()) > 0.1 * float(full.v_init.norm())


def test_split_rows_reassemble_the_full_rows():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = BaseModelOutputWithPast.__dataclass_fields__
    output_cache_field = "cache" if "cache" in fields else "past_key_values"
    """Prefix (right-padded, every position attended) + suffix reproduce each real row, and the
    suffix mask marks exactly the real tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0], [12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    pos = torch.arange(5).expand(3, 5)
    look = torch.tensor([2, 0, 4])
    calls = {}

    class Body(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            calls.update(ids=input_ids, mask=attention_mask, pos=position_ids)
            return BaseModelOutputWithPast(last_hidden_state=input_ids[..., None].float(),
                                           **{output_cache_field: "cache"})

    rows = SuffixRows.build(Body(), ids, mask, pos, look)
    assert calls["ids"].tolist() == [[5, 6, 0, 0], [0, 0, 0, 0], [12, 13, 14, 15]]
    assert calls["mask"].tolist() == [[1] * 4] * 3  # no fully masked query
    assert rows.cache == "cache"
    assert rows.input_ids.tolist() == [[7, 8, 0], [9, 10, 11], [16, 0, 0]]
    assert rows.position_ids.tolist() == [[2, 3, 4], [0, 1, 2], [4, 4, 4]]
    assert rows.attention_mask.tolist() == [[1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1],
                                            [1, 1, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="lookup index"):
        SuffixRows.build(Body(), ids, mask, pos, torch.tensor([2, 3, 4]))


def test_auto_checks_each_model_once_and_keeps_the_full_pass_on_disagreement(
        gpt2_tokenizer, monkeypatch):
    model = MODELS["gpt2"]()
    assert suffix_mod.known_verdict(model) is None
    full = _run(model, gpt2_tokenizer, "gpt2", "full")
    auto = _run(model, gpt2_tokenizer, "gpt2", "auto")
    assert suffix_mod.known_verdict(model) is True
    torch.testing.assert_close(auto.v_star, full.v_star, rtol=1e-5, atol=1e-6)

    # A model whose suffix pass is wrong (here: positions ignored) is caught and keeps the
    # full pass, with the full pass's numbers.
    other = MODELS["gpt2"]()
    real_hidden = SuffixRows.hidden

    def wrong(self, body):
        self.position_ids = torch.zeros_like(self.position_ids)
        return real_hidden(self, body)

    monkeypatch.setattr(SuffixRows, "hidden", wrong)
    auto = _run(other, gpt2_tokenizer, "gpt2", "auto")
    assert suffix_mod.known_verdict(other) is False
    torch.testing.assert_close(auto.v_star, full.v_star, rtol=0, atol=0)


def test_unknown_engine_is_refused(gpt2_tokenizer):
    with pytest.raises(ValueError, match="engine must be"):
        _run(MODELS["gpt2"](), gpt2_tokenizer, "gpt2", "fast")


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_rome_and_memit_updates_equal_under_both_passes(gpt2_tokenizer, monkeypatch, method):
    """The editors' default ("auto") gives the full pass's update (to float rounding)."""
    d_in = 128
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / (4 * d_in)
    if method == "rome":
        editor = ROME({"layer": 1, "v_num_grad_steps": 5, "context_templates": CONTEXTS,
                       "clamp_norm_factor": 10.0}, second_moment=lambda m, t, n: C)
        reqs = REQUESTS[0]
    else:
        editor = MEMIT({"layers": [0, 1], "v_num_grad_steps": 5, "context_templates": CONTEXTS,
                        "clamp_norm_factor": 10.0, "mom2_update_weight": 10.0},
                       second_moment=lambda m, t, n: C)
        reqs = REQUESTS
    model = MODELS["gpt2"]()
    fast = editor.edit(model, gpt2_tokenizer, reqs)
    assert suffix_mod.known_verdict(model) is True
    import lightning_rome.editing.context as context  # force the full pass

    orig = context._optimise_values
    monkeypatch.setattr(context, "_optimise_values",
                        lambda *a, **k: orig(*a, **{**k, "engine": "full"}))
    slow = type(editor)(editor.hparams, second_moment=lambda m, t, n: C).edit(
        model, gpt2_tokenizer, reqs)
    for name in slow.names:
        a, b = fast.dense(name, torch.float64), slow.dense(name, torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_auto_gives_bit_identical_values_on_the_first_and_later_calls(gpt2_tokenizer):
    """The first call on a model (which checks the suffix pass against the full one) computes
    with the pass the later calls use: the same request gives the same v*, bit for bit."""
    model = MODELS["gpt2"]()
    first = _run(model, gpt2_tokenizer, "gpt2", "auto")
    assert suffix_mod.known_verdict(model) is True
    again = _run(model, gpt2_tokenizer, "gpt2", "auto")
    assert torch.equal(first.v_star, again.v_star) and first.losses == again.losses
