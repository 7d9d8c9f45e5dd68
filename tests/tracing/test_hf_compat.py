"""The transformers adapter: its keyword probes, the probe of the prefix engine's private
block-call API, and the fallback to the public-API engine when that probe fails (same scores,
one warning)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tracing_helpers import SUBJECT, peaked_model

from lightning_rome.models import get_layout, hf_compat
from lightning_rome.models.hf_compat import (
    HFCompatWarning,
    cache_keyword,
    forward_cache_kwargs,
    output_cache,
    probe_prefix_blocks,
)
from lightning_rome.tracing import trace_all
from lightning_rome.tracing.core import resolve_engine

FAMILIES = ("gpt2", "gptj", "neox", "llama")
KINDS = ["hidden", "mlp", "attn", "hidden/sever=mlp"]
TRACE_KW = dict(window=2, samples=2, noise=1.0, seed=3)
PROMPT = "{} is in"


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    """Each test sees no earlier probe results and no earlier warnings."""
    monkeypatch.setattr(hf_compat, "_probes", type(hf_compat._probes)())
    monkeypatch.setattr(hf_compat, "_warned", set())


def test_cache_keyword_prefers_the_current_name():
    def new(x, cache=None, past_key_values=None):  # 5.25: both, `cache` current
        pass

    def old(x, past_key_values=None):
        pass

    def neox(x, layer_past=None):
        pass

    def v4_block(x, past_key_value=None, layer_past=None):
        pass

    def none(x, **kwargs):
        pass

    assert cache_keyword(new) == "cache"
    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(neox) == "layer_past"
    assert cache_keyword(v4_block) == "past_key_value"
    assert cache_keyword(none) is None
    with pytest.raises(TypeError, match="takes no cache argument"):
        forward_cache_kwargs(torch.nn.Linear(2, 2), object())


def test_installed_transformers_uses_the_cache_keyword():
    """With transformers >= 5.25 (where `past_key_values` is deprecated) the adapter passes
    `cache`, and a cached forward pass and its output raise no warning."""
    model = peaked_model("gpt2")
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 25):
        pytest.skip("transformers < 5.25 still uses past_key_values")
    assert cache_keyword(model) == "cache"
    assert cache_keyword(model.transformer.h[0]) == "cache"
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(input_ids=ids, use_cache=True)
        cache = output_cache(out)
        assert cache is not None
        model(input_ids=ids[:, -1:], use_cache=True, **forward_cache_kwargs(model, cache))


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_is_taken_on_the_installed_version(family, gpt2_tokenizer, monkeypatch):
    model = peaked_model(family)
    layout = get_layout(model)
    assert probe_prefix_blocks(model, layout) is None
    assert resolve_engine(model, layout, "auto") == "prefix"
    calls = []
    real = hf_compat.PrefixBlocks._call
    monkeypatch.setattr(hf_compat.PrefixBlocks, "_call",
                        lambda self, *a: calls.append(a[0]) or real(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning, no fallback warning
        trace_all(model, gpt2_tokenizer, PROMPT, SUBJECT, ["hidden"], engine="auto", **TRACE_KW)
    assert calls, "the prefix engine did not call the blocks directly"


def _remove_create_causal_mask(monkeypatch):
    import transformers.masking_utils as mu

    monkeypatch.delattr(mu, "create_causal_mask")


def _rename_cache_keyword(monkeypatch):
    monkeypatch.setattr(hf_compat, "CACHE_KEYWORDS", ("kv_store",))


def _wrong_mask(monkeypatch):
    """The private mask helper still exists but now means something else: the probe must see
    that the blocks no longer reproduce the model."""
    real = hf_compat._causal_mask

    def full(model, x, pos):
        mask = real(model, x, pos)
        return torch.ones_like(mask) if mask.dtype == torch.bool else torch.zeros_like(mask)

    monkeypatch.setattr(hf_compat, "_causal_mask", full)


BREAKS = {"removed function": (_remove_create_causal_mask, "create_causal_mask"),
          "renamed keyword": (_rename_cache_keyword, "takes no cache argument"),
          "different numbers": (_wrong_mask, "disagrees with the model")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("brk", list(BREAKS))
def test_forced_fallback_gives_the_same_scores_with_one_warning(family, brk, gpt2_tokenizer,
                                                                 monkeypatch):
    model = peaked_model(family)
    layout = get_layout(model)
    fast = trace_all(model, gpt2_tokenizer, PROMPT, SUBJECT, KINDS, engine="prefix", **TRACE_KW)
    monkeypatch.setattr(hf_compat, "_probes", type(hf_compat._probes)())
    breaker, reason = BREAKS[brk]
    breaker(monkeypatch)
    assert reason in probe_prefix_blocks(model, layout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slow = trace_all(model, gpt2_tokenizer, PROMPT, SUBJECT, KINDS, engine="auto",
                         **TRACE_KW)
        again = trace_all(model, gpt2_tokenizer, PROMPT, SUBJECT, ["hidden"], engine="prefix",
                          **TRACE_KW)
    compat = [w for w in caught if issubclass(w.category, HFCompatWarning)]
    assert len(compat) == 1, [str(w.message) for w in caught]
    assert "batched engine" in str(compat[0].message) and reason in str(compat[0].message)
    assert [w for w in caught if w not in compat] == []
    for label, t in fast.items():
        torch.testing.assert_close(slow[label].scores, t.scores, rtol=0, atol=1e-6)
        assert slow[label].low_score == pytest.approx(t.low_score, abs=1e-7)
        assert slow[label].high_score == pytest.approx(t.high_score, abs=1e-7)
    torch.testing.assert_close(again["hidden"].scores, fast["hidden"].scores, rtol=0, atol=1e-6)


def test_probe_runs_once_per_model(monkeypatch):
    model = peaked_model("gpt2")
    layout = get_layout(model)
    runs = []
    real = hf_compat._probe
    monkeypatch.setattr(hf_compat, "_probe", lambda m, lay: runs.append(1) or real(m, lay))
    for _ in range(3):
        assert probe_prefix_blocks(model, layout) is None
    assert len(runs) == 1
    model.train()
    model.transformer.h[0].eval()
    monkeypatch.setattr(hf_compat, "_probes", type(hf_compat._probes)())
    probe_prefix_blocks(model, layout)
    assert model.training and not model.transformer.h[0].training  # modes restored
