"""The batched and prefix engines against the naive cell-by-cell reference, and single cells
against restorations written by hand with plain PyTorch hooks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tracing_helpers import PROMPT, SUBJECT, peaked_gpt2, peaked_model

from lightning_rome.models import get_layout
from lightning_rome.tokens import encode_prompt, fill, subject_span
from lightning_rome.tracing import GaussianNoise, trace_all, window_layers
from lightning_rome.tracing.engine import (
    TraceSpec,
    make_cells,
    prefix_supported,
    run_clean_and_corrupted,
    score_cells,
)

SPECS = [TraceSpec("hidden"), TraceSpec("mlp"), TraceSpec("attn"),
         TraceSpec("hidden", "mlp"), TraceSpec("hidden", "attn")]


def _runs(model, tok, prompt=PROMPT, subject=SUBJECT, samples=3, nu=1.0, seed=0, kv=True):
    layout = get_layout(model)
    span = subject_span(tok, prompt, subject)
    ids = encode_prompt(tok, fill(prompt, subject)[0])
    corruption = GaussianNoise(nu=nu).draw(model, tok, prompt, subject, samples,
                                           torch.Generator().manual_seed(seed), layout)
    return layout, run_clean_and_corrupted(model, layout, ids, span, corruption, None,
                                           keep_kv=kv)


@pytest.mark.parametrize("family,window", [("gpt2-sdpa", 3), ("gpt2-eager", 1),
                                           ("llama-sdpa", 1), ("llama-eager", 3),
                                           ("gptj-sdpa", 3), ("gptj-eager", 1),
                                           ("neox-sdpa", 1), ("neox-eager", 3)])
def test_engines_match_naive_on_sampled_cells(family, window, gpt2_tokenizer):
    name, attn = family.split("-")
    model = peaked_model(name, attn=attn)
    layout, runs = _runs(model, gpt2_tokenizer)
    assert prefix_supported(model, layout) is None
    T, L = runs.input_ids.shape[0], layout.n_layers(model)
    cells = make_cells(SPECS, T, L, window=window)
    # Every cell at the last subject token and the last token, and a random sample elsewhere.
    rng = random.Random(0)
    e = runs.span[1]
    chosen = [c for c in cells if c.token in (e - 1, T - 1)]
    chosen += rng.sample([c for c in cells if c.token not in (e - 1, T - 1)], 24)
    naive = score_cells(model, layout, runs, chosen, "naive")
    batched = score_cells(model, layout, runs, chosen, "batched")
    prefix = score_cells(model, layout, runs, chosen, "prefix", batch_tokens=64)  # many chunks
    spread = float(naive.max() - naive.min())
    assert spread > 1e-3, "the test model must make restorations matter"
    torch.testing.assert_close(batched, naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(prefix, naive, rtol=0, atol=1e-6)


def test_full_traces_agree_across_engines(gpt2_tokenizer):
    model = peaked_gpt2(n_layer=3)
    kw = dict(window=2, samples=2, noise=1.0, seed=3)
    short = "{} is in"
    res = {eng: trace_all(model, gpt2_tokenizer, short, "Space Needle",
                          ["hidden", "mlp", "attn", "hidden/sever=mlp"], engine=eng, **kw)
           for eng in ("naive", "batched", "prefix")}
    for label, t in res["naive"].items():
        for eng in ("batched", "prefix"):
            torch.testing.assert_close(res[eng][label].scores, t.scores, rtol=0, atol=1e-6)
            assert res[eng][label].low_score == pytest.approx(t.low_score, abs=1e-7)
            assert res[eng][label].high_score == pytest.approx(t.high_score, abs=1e-7)


def test_generic_family_uses_batched_engine(gpt2_tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=50257, num_layers=2, hidden_size=32, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=4,
        initializer_range=0.3)).eval()
    layout = get_layout(model)
    assert "gpt_neo" in prefix_supported(model, layout)
    with pytest.raises(ValueError, match="prefix engine supports"):
        trace_all(model, gpt2_tokenizer, "{} is in", SUBJECT, ["hidden"], engine="prefix")
    auto = trace_all(model, gpt2_tokenizer, "{} is in", SUBJECT, ["hidden", "attn"], window=2,
                     samples=2, noise=1.0, engine="auto")
    naive = trace_all(model, gpt2_tokenizer, "{} is in", SUBJECT, ["hidden", "attn"], window=2,
                      samples=2, noise=1.0, engine="naive")
    for k in auto:
        torch.testing.assert_close(auto[k].scores, naive[k].scores, rtol=0, atol=1e-6)


def _by_hand(model, tok, runs, token, restore, freeze=()):
    """The score of one cell with hand-written forward hooks (no package machinery):
    corrupted inputs built from ``inputs_embeds``, clean activations from a separate clean run."""
    ids = runs.input_ids[None]
    blocks = model.transformer.h
    modules = {("block", j): blocks[j] for j in range(len(blocks))}
    modules |= {("mlp", j): blocks[j].mlp for j in range(len(blocks))}
    modules |= {("attn", j): blocks[j].attn for j in range(len(blocks))}
    clean, corrupt = {}, {}

    def recorder(store, key):
        def hook(mod, args, out):
            store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    def run(embeds, store=None, edits=None):
        handles = []
        for key, mod in modules.items():
            if store is not None:
                handles.append(mod.register_forward_hook(recorder(store, key)))
            if edits and key in edits:
                def patch(mod, args, out, value=edits[key]):
                    x = (out[0] if isinstance(out, tuple) else out).clone()
                    x[:, token] = value
                    return (x, *out[1:]) if isinstance(out, tuple) else x
                handles.append(mod.register_forward_hook(patch))
        try:
            with torch.no_grad():
                return model(inputs_embeds=embeds).logits[:, -1]
        finally:
            for h in handles:
                h.remove()

    wte = model.transformer.wte.weight[ids[0]]  # (T, d)
    S = runs.samples
    b, e = runs.span
    noisy = wte[None].repeat(S, 1, 1)
    noisy[:, b:e] += runs.corruption.values
    run(wte[None], clean)
    run(noisy, corrupt)
    edits = {k: clean[k][0, token] for k in restore}
    edits |= {k: corrupt[k][:, token] for k in freeze}
    logits = run(noisy, edits=edits)
    return float(F.softmax(logits, -1)[:, runs.answer_id].mean())


def test_cells_match_hand_written_restoration(gpt2_model, gpt2_tokenizer):
    layout, runs = _runs(gpt2_model, gpt2_tokenizer, samples=3, nu=1.5)
    traces = trace_all(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT,
                       ["hidden", "mlp", "attn", "hidden/sever=mlp"], window=3, samples=3,
                       noise=1.5)
    L = layout.n_layers(gpt2_model)
    b, e = runs.span
    for token, layer in [(e - 1, 1), (e - 1, 2), (runs.input_ids.shape[0] - 1, 0), (b, 3)]:
        assert traces["hidden"].scores[token, layer] == pytest.approx(
            _by_hand(gpt2_model, gpt2_tokenizer, runs, token, [("block", layer)]), abs=1e-6)
        win = [("mlp", j) for j in window_layers(layer, 3, L)]
        assert traces["mlp"].scores[token, layer] == pytest.approx(
            _by_hand(gpt2_model, gpt2_tokenizer, runs, token, win), abs=1e-6)
        win = [("attn", j) for j in window_layers(layer, 3, L)]
        assert traces["attn"].scores[token, layer] == pytest.approx(
            _by_hand(gpt2_model, gpt2_tokenizer, runs, token, win), abs=1e-6)
        frozen = [("mlp", j) for j in range(layer + 1, L)]
        assert traces["hidden/sever=mlp"].scores[token, layer] == pytest.approx(
            _by_hand(gpt2_model, gpt2_tokenizer, runs, token, [("block", layer)], frozen),
            abs=1e-6)


def test_window_layers_follow_the_published_convention():
    # range(max(0, l − w // 2), min(L, l − (−w // 2))): for w = 10, l−5 … l+4.
    assert list(window_layers(7, 10, 48)) == list(range(2, 12))
    assert list(window_layers(0, 10, 12)) == [0, 1, 2, 3, 4]
    assert list(window_layers(11, 10, 12)) == [6, 7, 8, 9, 10, 11]
    assert list(window_layers(3, 1, 12)) == [3]
    assert list(window_layers(3, 3, 12)) == [2, 3, 4]
    assert list(window_layers(5, 12, 12)) == list(range(0, 11))
