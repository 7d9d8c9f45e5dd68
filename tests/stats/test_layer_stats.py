"""get_second_moment against independent computations of C = E[k kᵀ], and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from testutils import tiny_gpt2

import lightning_rome.stats.collect as collect_mod
from lightning_rome.data.text import as_corpus
from lightning_rome.hooks import module_hooks
from lightning_rome.stats import get_second_moment, get_second_moments

N_TEXTS = 40
SEQ_LEN = 24


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(N_TEXTS))


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


@torch.no_grad()
def manual_c_proj_input(model, ids, layer):
    """GPT-2's c_proj input, gelu(c_fc(ln_2(h + attn(ln_1(h))))), from the block's weights.

    ``h`` is the block's input (``hidden_states[layer]``); attention is written out by hand, and
    the block output rebuilt from it is checked against the model's next hidden state."""
    cfg = model.config
    d, H = cfg.n_embd, cfg.n_head
    out = model.transformer(torch.tensor([ids]), output_hidden_states=True)  # no LM head
    h = out.hidden_states[layer][0].double()  # (T, d)
    blk = model.transformer.h[layer]
    w = {n: p.double() for n, p in blk.named_parameters()}
    T = h.shape[0]
    x = F.layer_norm(h, (d,), w["ln_1.weight"], w["ln_1.bias"], cfg.layer_norm_epsilon)
    qkv = x @ w["attn.c_attn.weight"] + w["attn.c_attn.bias"]  # (T, 3d); Conv1D is [in, out]
    q, k, v = (t.reshape(T, H, d // H).transpose(0, 1) for t in qkv.split(d, dim=-1))  # (H,T,dh)
    scores = q @ k.transpose(1, 2) / math.sqrt(d // H)  # (H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (H, T, dh)
    a = att.transpose(0, 1).reshape(T, d) @ w["attn.c_proj.weight"] + w["attn.c_proj.bias"]
    h2 = h + a  # (T, d)
    x2 = F.layer_norm(h2, (d,), w["ln_2.weight"], w["ln_2.bias"], cfg.layer_norm_epsilon)
    key = gelu_new(x2 @ w["mlp.c_fc.weight"] + w["mlp.c_fc.bias"])  # (T, d_ff)
    h3 = h2 + key @ w["mlp.c_proj.weight"] + w["mlp.c_proj.bias"]  # (T, d) block output
    nxt = out.hidden_states[layer + 1][0].double()
    if layer == cfg.n_layer - 1:
        lnf = model.transformer.ln_f
        h3 = F.layer_norm(h3, (d,), lnf.weight.double(), lnf.bias.double(), lnf.eps)
    torch.testing.assert_close(h3, nxt, rtol=1e-4, atol=1e-4)  # the reference is right
    return key


def token_rows(tok, texts, seq_len=SEQ_LEN):
    return [tok(t)["input_ids"][:seq_len] for t in texts]


@pytest.mark.parametrize("layer", [0, 1])
def test_matches_manual_gpt2_mlp_activation(model, gpt2_tokenizer, texts, layer):
    rows = token_rows(gpt2_tokenizer, texts)
    K = torch.cat([manual_c_proj_input(model, ids, layer) for ids in rows])  # (n, d_ff)
    C_ref = K.T @ K / K.shape[0]  # (d_ff, d_ff)
    stats = get_second_moment(model, gpt2_tokenizer, layer, corpus=texts, n_samples=N_TEXTS,
                              seq_len=SEQ_LEN, batch_size=7, cache=False)
    assert stats.meta["module"] == f"transformer.h.{layer}.mlp.c_proj"
    assert stats.count == K.shape[0] == sum(len(r) for r in rows)  # no padding counted
    assert stats.n_texts == N_TEXTS
    assert stats.mom2.shape == (4 * 32, 4 * 32) and stats.mom2.dtype == torch.float64
    torch.testing.assert_close(stats.mom2, C_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mean, K.mean(0), rtol=1e-5, atol=1e-6)


def test_several_layers_in_one_pass_match_unpadded_runs(model, gpt2_tokenizer, texts):
    names = [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)] + ["transformer.h.1.attn.c_proj"]
    ref = {n: [] for n in names}
    for ids in token_rows(gpt2_tokenizer, texts, 40):  # one text at a time: no padding at all
        with module_hooks(model, names, retain_input=True) as rec, torch.no_grad():
            model.transformer(torch.tensor([ids]))
        for n in names:
            ref[n].append(rec[n].input[0].double())
    stats = get_second_moments(model, gpt2_tokenizer, [0, 1, "transformer.h.1.attn.c_proj"],
                               corpus=texts, n_samples=len(texts), seq_len=40, batch_tokens=160,
                               cache=False)
    assert list(stats) == names
    for n in names:
        K = torch.cat(ref[n])  # (n, d)
        assert stats[n].count == K.shape[0]
        torch.testing.assert_close(stats[n].mom2, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-6)


def test_batching_and_early_stop_do_not_change_the_result(model, gpt2_tokenizer, texts):
    kw = dict(corpus=texts, n_samples=30, seq_len=SEQ_LEN, cache=False)
    a = get_second_moment(model, gpt2_tokenizer, 0, batch_size=1, **kw)
    b = get_second_moment(model, gpt2_tokenizer, 0, batch_size=16, stop_early=False, **kw)
    assert a.count == b.count
    torch.testing.assert_close(a.mom2, b.mom2, rtol=1e-5, atol=1e-7)


def test_n_samples_and_token_budget(model, gpt2_tokenizer, texts):
    rows = token_rows(gpt2_tokenizer, texts[:20])
    by_texts = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, n_samples=20,
                                 seq_len=SEQ_LEN, cache=False)
    assert by_texts.count == sum(map(len, rows)) and by_texts.n_texts == 20
    budget = sum(map(len, rows[:9])) + 5  # ends 5 tokens into text 9
    by_tokens = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, n_samples=None,
                                  n_tokens=budget, seq_len=SEQ_LEN, cache=False)
    assert by_tokens.count == budget and by_tokens.n_texts == 10
    K = torch.cat([manual_c_proj_input(model, ids, 1) for ids in [*rows[:9], rows[9][:5]]])
    torch.testing.assert_close(by_tokens.mom2, K.T @ K / budget, rtol=1e-5, atol=1e-6)


def test_dtype_options(gpt2_tokenizer, texts):
    model32 = tiny_gpt2()
    kw = dict(corpus=texts, n_samples=20, seq_len=SEQ_LEN, cache=False)
    ref = get_second_moment(model32, gpt2_tokenizer, 1, **kw)
    f32 = get_second_moment(model32, gpt2_tokenizer, 1, dtype=torch.float32, **kw)
    assert f32.mom2.dtype == torch.float32
    torch.testing.assert_close(f32.mom2.double(), ref.mom2, rtol=1e-5, atol=1e-6)
    bf16 = get_second_moment(tiny_gpt2().to(torch.bfloat16), gpt2_tokenizer, 1, **kw)
    assert bf16.mom2.dtype == torch.float64 and bf16.count == ref.count
    rel = (bf16.mom2 - ref.mom2).norm() / ref.mom2.norm()
    assert rel < 0.05  # bfloat16 activations, float64 sums
    with pytest.raises(ValueError, match=r"float64 or torch\.float32"):
        get_second_moment(model32, gpt2_tokenizer, 1, dtype=torch.float16, **kw)


def test_training_mode_is_restored_and_dropout_off(gpt2_tokenizer, texts):
    model = tiny_gpt2()
    ref = get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=10,
                            seq_len=SEQ_LEN, cache=False)
    model.train()
    again = get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=10,
                              seq_len=SEQ_LEN, cache=False)
    assert model.training
    assert torch.equal(ref.mom2_sum, again.mom2_sum)


def test_progress_bar_can_be_forced(model, gpt2_tokenizer, texts, capsys):
    get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=8, seq_len=8,
                      cache=False, progress=True)
    assert "second moments" in capsys.readouterr().err


def test_default_corpus_is_local_wikitext(model, gpt2_tokenizer, tmp_path):
    stats = get_second_moment(model, gpt2_tokenizer, 0, n_samples=5, seq_len=8, cache=tmp_path)
    ref = get_second_moment(model, gpt2_tokenizer, 0, corpus=list(as_corpus("wikitext-2")),
                            n_samples=5, seq_len=8, cache=False)
    assert torch.equal(stats.mom2_sum, ref.mom2_sum)
    assert "valid.txt" in stats.meta["corpus"]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_missing_corpus_path(model, gpt2_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=str(tmp_path / "missing.txt"),
                          n_samples=5, cache=False)


@pytest.mark.parametrize("content", ["", "\n\n = Heading only = \n  \n"])
def test_empty_corpus_file(model, gpt2_tokenizer, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=path, n_samples=5, cache=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_empty_list_corpus(model, gpt2_tokenizer):
    with pytest.raises(ValueError, match="is empty"):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=[], n_samples=5, cache=False)


def test_layer_out_of_range_and_unknown_module(model, gpt2_tokenizer, texts):
    with pytest.raises(IndexError, match="out of range"):
        get_second_moment(model, gpt2_tokenizer, 2, corpus=texts, n_samples=5, cache=False)
    with pytest.raises(IndexError, match="out of range"):
        get_second_moment(model, gpt2_tokenizer, -1, corpus=texts, n_samples=5, cache=False)
    with pytest.raises(ValueError, match="not in the model"):
        get_second_moment(model, gpt2_tokenizer, "transformer.h.0.mlp.nope", corpus=texts,
                          n_samples=5, cache=False)
    with pytest.raises(ValueError, match="n_samples"):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=0, cache=False)


def test_short_corpus_warns(model, gpt2_tokenizer, texts):
    with pytest.warns(UserWarning, match="fewer than n_samples=100"):
        stats = get_second_moment(model, gpt2_tokenizer, 0, corpus=texts[:4], n_samples=100,
                                  seq_len=8, cache=False)
    assert stats.n_texts == 4


def test_hooks_are_removed_even_after_errors(model, gpt2_tokenizer, texts, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(collect_mod.SecondMoment, "update", boom)
    with pytest.raises(RuntimeError, match="boom"):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=3, cache=False)
    c_proj = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert not c_proj._forward_pre_hooks and not c_proj._forward_hooks
