"""Length-sorted batching, the early stop, the autocast forward and the blocked product.

C must not depend on how the texts are batched beyond float64 rounding: a float64 model makes
the forward pass itself exact enough to check that to 1e-10 against a one-text-at-a-time sum.
"""

from __future__ import annotations

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome.data.text import as_corpus
from lightning_rome.hooks import module_hooks
from lightning_rome.stats import collect_second_moments, get_second_moment, get_second_moments
from lightning_rome.stats.collect import (
    DEFAULT_PASS_COST,
    batch_rows,
    iter_token_rows,
    pass_cost,
    sorted_batches,
)
from lightning_rome.stats.moments import add_gram

N_TEXTS = 40
SEQ_LEN = 48
NAME = "transformer.h.0.mlp.c_proj"


@pytest.fixture(scope="module")
def model64():
    return tiny_gpt2().double()


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(N_TEXTS))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def one_by_one(model, tok, texts, name, seq_len=SEQ_LEN):
    """``Σ_t k_t k_tᵀ / n`` over the real tokens, one text per full forward pass, with a plain
    torch hook (not the package's): no padding, no batching, no early stop."""
    keys = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args: keys.append(args[0][0].double()))
    try:
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"][:seq_len]
            if ids:
                model(torch.tensor([ids]))
    finally:
        handle.remove()
    K = torch.cat(keys)  # (n, d)
    return K.T @ K / K.shape[0], K.shape[0]


def test_c_does_not_depend_on_the_budget_and_equals_the_unpadded_sum(model64, gpt2_tokenizer,
                                                                       texts):
    C_ref, n = one_by_one(model64, gpt2_tokenizer, texts, NAME)
    kw = dict(corpus=texts, n_samples=N_TEXTS, seq_len=SEQ_LEN, cache=False)
    runs = [dict(batch_tokens=SEQ_LEN), dict(batch_tokens=200), dict(batch_tokens=100_000),
            dict(batch_tokens=None, batch_size=3), dict(batch_tokens=500, batch_size=5)]
    results = [get_second_moment(model64, gpt2_tokenizer, 0, **kw, **r) for r in runs]
    padded = [m.meta["padded_tokens"] for m in results]
    assert len(set(padded)) > 1  # the settings did batch differently
    for m in results:
        assert m.count == n and m.n_texts == N_TEXTS and m.mom2.dtype == torch.float64
        assert rel(m.mom2, C_ref) < 1e-10
        assert rel(m.mom2, results[0].mom2) < 1e-10
    assert padded[0] == n  # one text per pass: no padding at all


def test_one_pass_over_layers_and_sort_windows_equals_the_unbatched_sum(gpt2_tokenizer, texts):
    """Several layers in one pass, with sort windows and budgets that cut the texts into other
    batches (and another processing order), each equal to its own one-text-at-a-time sum."""
    model = tiny_gpt2(n_layer=3).double()
    names = ["transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    refs = {n: one_by_one(model, gpt2_tokenizer, texts, n) for n in names}
    padded = set()
    for window, budget, rows in ((7, 150, None), (N_TEXTS, None, 8), (1, None, None)):
        got = collect_second_moments(model, gpt2_tokenizer, names, texts, n_samples=N_TEXTS,
                                     seq_len=SEQ_LEN, batch_tokens=budget, batch_size=rows,
                                     sort_window=window)
        padded.add(got[names[0]].meta["padded_tokens"])
        for n in names:
            C_ref, count = refs[n]
            assert got[n].count == count and got[n].n_texts == N_TEXTS
            assert rel(got[n].mom2, C_ref) < 1e-10
    assert len(padded) > 1  # the batchings differ (window 1: one text a pass, no padding)


def test_the_pass_cost_follows_the_device_and_the_model_size():
    """A pass of a GPT-2-small-sized model on a CPU costs few tokens' worth (its batches pad
    less: more, smaller batches) against an accelerator's or a tiny model's; both keep every
    text once and respect the budget."""
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=64))
    assert pass_cost(small, 4096) == pytest.approx(1 / 512)  # ~14M block parameters
    assert pass_cost(tiny_gpt2(), 4096) == DEFAULT_PASS_COST == 1 / 32  # held to 1/32
    assert pass_cost(small, None) == DEFAULT_PASS_COST
    if torch.cuda.is_available():
        assert pass_cost(tiny_gpt2().cuda(), 4096) == DEFAULT_PASS_COST
    lengths = [3 + (7 * i) % 97 for i in range(300)]
    rows = [(i, [1] * n) for i, n in enumerate(lengths)]

    def padded(batches):
        return sum(len(b) * len(b[0][1]) for b in batches)

    cheap = sorted_batches(rows, batch_tokens=1024, cost=1 / 512)
    costly = sorted_batches(rows, batch_tokens=1024, cost=DEFAULT_PASS_COST)
    for batches in (cheap, costly):
        assert sorted(i for b in batches for i, _ in b) == list(range(len(rows)))
        assert all(len(b) * len(b[0][1]) <= 1024 for b in batches)
    assert padded(cheap) < padded(costly) and len(cheap) > len(costly)
    assert padded(cheap) < 1.02 * sum(lengths)
    with pytest.raises(ValueError, match="cost"):
        sorted_batches(rows, cost=-1.0)


def test_sorted_batches_respect_the_budget_and_keep_every_text():
    rows = [(i, list(range(n))) for i, n in enumerate([5, 0, 17, 3, 17, 9, 40, 1, 0, 12])]
    batches = sorted_batches(rows, batch_tokens=34, batch_size=3)
    seen = [i for b in batches for i, _ in b]
    assert sorted(seen) == list(range(len(rows)))  # every row exactly once, empty ones too
    flat = [len(ids) for b in batches for _, ids in b]
    assert flat == sorted(flat, reverse=True)  # longest first
    assert [i for i, ids in batches[0]] == [6]  # 40 tokens: over the budget, alone
    for b in batches:
        width = len(b[0][1])
        real = [ids for _, ids in b if ids]
        assert len(b) == 1 or len(real) * width <= 34
        assert len(real) <= 3
    assert [i for i, _ in batches[1]] == [2, 4]  # equal lengths keep corpus order
    with pytest.raises(ValueError, match="window"):
        list(batch_rows(rows, window=0))


def test_sorting_pads_less_than_corpus_order(gpt2_tokenizer, texts):
    rows = list(iter_token_rows(texts, gpt2_tokenizer, seq_len=1024))
    real = sum(len(ids) for _, ids in rows)

    def padded(batches):
        return sum(len(b) * max(len(ids) for _, ids in b) for b in batches)

    in_order = padded([rows[i:i + 8] for i in range(0, len(rows), 8)])
    budget = max(len(ids) for _, ids in rows) * 2
    by_length = padded(list(batch_rows(rows, batch_tokens=budget)))
    assert by_length < in_order
    assert by_length < 1.1 * real < in_order


def test_windows_bound_the_sort_and_set_checkpoints(model64, gpt2_tokenizer, texts):
    saved = []
    out = get_second_moment(model64, gpt2_tokenizer, 0, corpus=texts, n_samples=N_TEXTS,
                            seq_len=SEQ_LEN, checkpoint_every=15, cache=False)
    got = collect_second_moments(model64, gpt2_tokenizer, [NAME], texts, n_samples=N_TEXTS,
                                 seq_len=SEQ_LEN, checkpoint_every=15,
                                 on_checkpoint=lambda m: saved.append(m[NAME].n_texts))[NAME]
    assert saved == [15, 30]  # windows of 15 texts, each done as a whole
    assert got.n_texts == N_TEXTS and rel(got.mom2, out.mom2) < 1e-12


class Calls:
    """Counts the completed runs of named modules (plain torch forward hooks)."""

    def __init__(self, model, names):
        self.n = dict.fromkeys(names, 0)
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                        for n in names]

    def _hook(self, name):
        def hook(mod, args, out):
            self.n[name] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_stop_ends_the_pass_at_the_last_needed_module(gpt2_tokenizer):
    model = tiny_gpt2(n_layer=3)
    ids = torch.tensor([[10, 20, 30, 40]])
    watched = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj", "transformer.h.2",
               "lm_head"]
    calls = Calls(model, watched)
    try:
        with module_hooks(model, ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
                          retain_input=True, stop=True) as rec, torch.no_grad():
            assert model(input_ids=ids) is None
            assert model(input_ids=ids) is None  # each call is a new pass
        # inputs only: stopped before h.1's c_proj ran (its input was recorded)
        assert calls.n == {"transformer.h.1.mlp.c_fc": 2, "transformer.h.1.mlp.c_proj": 0,
                           "transformer.h.2": 0, "lm_head": 0}
        assert rec["transformer.h.1.mlp.c_proj"].input.shape == (1, 4, 128)
        assert "forward" not in vars(model)  # the wrapper is gone
        with torch.no_grad():
            full = model(input_ids=ids)
        assert full.logits.shape == (1, 4, 50257) and calls.n["lm_head"] == 1
        # an output is wanted: the module runs, the rest does not
        with module_hooks(model, ["transformer.h.1"], retain_output=True,
                          stop=True) as rec, torch.no_grad():
            assert model(input_ids=ids) is None
        assert calls.n["transformer.h.1.mlp.c_proj"] == 2 and calls.n["transformer.h.2"] == 1
        assert rec["transformer.h.1"].output.shape == (1, 4, 32)
    finally:
        calls.remove()
    with pytest.raises(ValueError, match="stop=True"), module_hooks(model, ["transformer.h.1"],
                                                                   stop=True):
        pass


def test_collection_never_runs_the_layers_above(gpt2_tokenizer, texts):
    model = tiny_gpt2(n_layer=3)
    calls = Calls(model, ["transformer.h.1.mlp.c_proj", "transformer.h.2", "lm_head"])
    try:
        get_second_moments(model, gpt2_tokenizer, [0, 1], corpus=texts[:6], n_samples=6,
                           seq_len=16, cache=False)
    finally:
        calls.remove()
    assert set(calls.n.values()) == {0}


def test_bf16_autocast_forward_sums_in_float64(gpt2_tokenizer, texts, tmp_path):
    model = tiny_gpt2()
    kw = dict(corpus=texts[:12], n_samples=12, seq_len=SEQ_LEN)
    ref = get_second_moment(model, gpt2_tokenizer, 0, cache=tmp_path, **kw)
    bf = get_second_moment(model, gpt2_tokenizer, 0, cache=tmp_path,
                           forward_dtype=torch.bfloat16, **kw)
    assert bf.mom2.dtype == torch.float64 and bf.count == ref.count
    assert bf.meta["forward_dtype"] == "bfloat16" and bf.meta["key"]["forward_dtype"] == "bfloat16"
    assert bf.meta["key"] != ref.meta["key"]  # not served from the float32 pass's file
    assert 1e-6 < rel(bf.mom2, ref.mom2) < 3e-2  # bf16 rounding: close, but not the same
    assert next(model.parameters()).dtype == torch.float32  # the model is left alone
    with pytest.raises(ValueError, match="forward_dtype"):
        get_second_moment(model, gpt2_tokenizer, 0, cache=False, forward_dtype=torch.float64,
                          **kw)


@pytest.mark.parametrize("d, n", [(1100, 200), (1100, 7), (96, 300)])
def test_blocked_gram_equals_the_full_product(d, n):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, d, generator=g, dtype=torch.float64)
    S = A.T @ A  # (d, d), symmetric, as after earlier batches
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = S + k.T @ k
    add_gram(S, k)
    assert rel(S, expected) < 1e-14
    assert float((S - S.T).abs().max()) <= 1e-13 * float(S.abs().max())
