"""Issue 18, item 4: the caches are keyed by everything that determines their content.

- The statistics key of a module covers every parameter upstream of it (a change of the layer-0
  attention changes layer 1's C), but not the module's own weight (ROME/MEMIT rewrite it) nor
  anything downstream.
- A corpus file's fingerprint covers the whole file (a same-size edit in the middle counts).
- MEMIT's z cache covers the whole model (z is optimised through every layer).
"""

from __future__ import annotations

import os

import pytest
import torch
from testutils import GPT2_TOKENIZER, tiny_gpt2

import lightning_rome.stats.collect as collect_mod
from lightning_rome.corpora import TextFileCorpus
from lightning_rome.data.text import as_corpus
from lightning_rome.editing import MEMIT, ROME
from lightning_rome.models import load_tokenizer
from lightning_rome.requests import EditRequest
from lightning_rome.stats import get_second_moment, stats_key

KW = dict(n_samples=24, seq_len=16, batch_size=4)
C1 = "transformer.h.1.mlp.c_proj"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER)


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(60))


@pytest.fixture(autouse=True)
def _no_memo():
    collect_mod._MEMO.clear()
    yield
    collect_mod._MEMO.clear()


def _key(model, tok, name=C1):
    return stats_key(model, tok, name, corpus_id="c", n_samples=1, n_tokens=None, seq_len=8,
                     dtype=torch.float64)["model"]


def test_upstream_attention_change_recomputes_C(tok, texts, tmp_path):
    """Scaling layer 0's attention weight changes layer 1's C (by much); the cache must see it."""
    model = tiny_gpt2(n_layer=3)
    first = get_second_moment(model, tok, 1, corpus=texts, cache=tmp_path, **KW)
    key0 = _key(model, tok)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(3.0)
    assert _key(model, tok) != key0
    cached = get_second_moment(model, tok, 1, corpus=texts, cache=tmp_path, **KW)
    fresh = get_second_moment(model, tok, 1, corpus=texts, cache=False, **KW)
    torch.testing.assert_close(cached.mom2, fresh.mom2, rtol=0, atol=0)
    assert not torch.allclose(fresh.mom2, first.mom2, rtol=1e-3)  # the change matters


@pytest.mark.parametrize("which", ["embedding", "position", "layer0_mlp_out", "layer1_ln",
                                   "layer1_c_fc", "data_scale"])
def test_every_upstream_parameter_is_in_the_key(tok, which):
    model = tiny_gpt2(n_layer=3)
    before = _key(model, tok)
    t = model.transformer
    with torch.no_grad():
        if which == "embedding":
            t.wte.weight[5].add_(1e-3)  # one row only
        elif which == "position":
            t.wpe.weight[0, 0].add_(1e-3)
        elif which == "layer0_mlp_out":
            t.h[0].mlp.c_proj.weight.add_(1e-3)
        elif which == "layer1_ln":
            t.h[1].ln_2.bias.add_(1e-3)
        elif which == "layer1_c_fc":
            t.h[1].mlp.c_fc.weight.add_(1e-3)
        else:  # a write through .data bypasses the version counter
            t.h[0].attn.c_proj.weight.data.mul_(2.0)
    assert _key(model, tok) != before


def test_own_weight_and_downstream_do_not_change_the_key(tok):
    """The module's own weight (what ROME writes) and later layers do not change its input."""
    model = tiny_gpt2(n_layer=3)
    before = _key(model, tok)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.add_(1e-2)
        model.transformer.h[1].mlp.c_proj.bias.add_(1e-2)
        model.transformer.h[2].mlp.c_fc.weight.add_(1e-2)
        model.transformer.h[2].attn.c_attn.weight.add_(1e-2)
        model.transformer.ln_f.weight.add_(1e-2)
    assert _key(model, tok) == before


def test_key_is_hashed_once_per_parameter_version(tok, monkeypatch):
    """The full-content hash of a parameter is computed once until the parameter changes."""
    import lightning_rome.models.fingerprint as fp

    model = tiny_gpt2(n_layer=3)
    calls = []
    real = fp._full_digest
    monkeypatch.setattr(fp, "_full_digest", lambda t: calls.append(1) or real(t))
    fp._DIGESTS.clear()
    _key(model, tok)
    n = len(calls)
    assert n > 0
    _key(model, tok)
    assert len(calls) == n
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    _key(model, tok)
    assert len(calls) == n + 1


def test_corpus_fingerprint_sees_a_same_size_edit_in_the_middle(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i:07d} of a long corpus file with some words in it" for i in range(60_000)]
    path.write_text("\n".join(lines) + "\n")  # > 3 MiB
    assert path.stat().st_size > 3 << 20
    before = TextFileCorpus(path).identity
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid] = ord("X") if data[mid] != ord("X") else ord("Y")
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert path.stat().st_size == st.st_size
    assert TextFileCorpus(path).identity != before


def test_corpus_identity_of_one_instance_follows_the_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first text\nsecond text\n")
    corpus = TextFileCorpus(path)
    before = corpus.identity
    path.write_text("first text\nsecond texT\n")
    assert corpus.identity != before


REQ = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")


def _sm(model, tok, name):
    d = model.get_submodule(name).weight.shape[0]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (4 * d)


def test_memit_z_cache_sees_a_rome_edit_outside_its_layers(tok, tmp_path):
    model = tiny_gpt2(n_layer=3)
    memit = MEMIT({"layers": [1], "v_num_grad_steps": 2, "context_templates": ["{}"],
                   "z_cache": str(tmp_path)}, second_moment=_sm)
    memit.compute_z(model, tok, [REQ])
    memit.compute_z(model, tok, [REQ])
    assert memit.last_stats["z_cached"] == 1  # the cache works
    rome = ROME({"layer": 2, "v_num_grad_steps": 2, "context_templates": ["{}"]},
                second_moment=_sm)
    rome.edit(model, tok, EditRequest("{} is in", "Eiffel Tower", "Rome"), apply=True)
    memit.compute_z(model, tok, [REQ])
    assert memit.last_stats["z_cached"] == 0
