"""Second moments as a Lightning job: one process and two (ddp_spawn), against one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from testutils import tiny_gpt2

import lightning_rome.stats.collect as collect_mod
from lightning_rome.data.text import as_corpus
from lightning_rome.hooks import module_hooks
from lightning_rome.modules import SecondMomentModule, compute_second_moments_distributed
from lightning_rome.stats import get_second_moments
from lightning_rome.stats.collect import iter_token_rows

N = 45  # not a multiple of the world size
KW = dict(n_samples=N, seq_len=16, batch_size=4)
NAMES = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(N))


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False,
                default_root_dir=tmp_path)
    args.update(kw)
    return L.Trainer(**args)


def direct_reference(model, tok, texts, names):
    """K.T @ K / n from unpadded single-text forwards."""
    ks = {n: [] for n in names}
    for t in texts:
        ids = tok(t)["input_ids"][:16]
        with module_hooks(model, names, retain_input=True) as rec, torch.no_grad():
            model.transformer(torch.tensor([ids]))
        for n in names:
            ks[n].append(rec[n].input[0].double())
    return {n: torch.cat(v) for n, v in ks.items()}


def test_one_device_matches_get_second_moments(gpt2_tokenizer, texts, tmp_path):
    model = tiny_gpt2()
    ref = get_second_moments(model, gpt2_tokenizer, [0, 1], corpus=texts, cache=False, **KW)
    out = compute_second_moments_distributed(model, gpt2_tokenizer, [0, 1], corpus=texts,
                                             cache=False, trainer=trainer(tmp_path), **KW)
    assert list(out) == NAMES
    for n in NAMES:
        assert out[n].count == ref[n].count and out[n].n_texts == N
        torch.testing.assert_close(out[n].mom2, ref[n].mom2, rtol=1e-12, atol=1e-14)
        assert len(out[n].meta["tokens_per_sec_per_rank"]) == 1
        assert out[n].meta["tokens_per_sec_per_rank"][0] > 0
    out[NAMES[0]].mom2_sum.add_(0)  # an ordinary tensor, not an inference tensor


def test_module_logs_tokens_per_second(gpt2_tokenizer, texts, tmp_path):
    model = tiny_gpt2()
    module = SecondMomentModule(model, gpt2_tokenizer, [1], corpus=texts, cache=False, **KW)
    tr = trainer(tmp_path)
    tr.predict(module, return_predictions=False)
    assert module.tokens_per_sec[0] > 0
    assert float(tr.callback_metrics["stats/tokens_per_sec/rank0"]) == pytest.approx(
        module.tokens_per_sec[0])
    K = direct_reference(model, gpt2_tokenizer, texts, [NAMES[1]])[NAMES[1]]
    res = module.results[NAMES[1]]
    assert res.count == K.shape[0]
    torch.testing.assert_close(res.mom2, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-6)


def test_empty_corpus_fails_in_the_job(gpt2_tokenizer, tmp_path):
    module = SecondMomentModule(tiny_gpt2(), gpt2_tokenizer, [0], corpus=["  ", ""], cache=False,
                                n_samples=5)
    with pytest.raises(ValueError, match="is empty"):
        trainer(tmp_path).predict(module, return_predictions=False)
    with pytest.raises(IndexError, match="out of range"):
        SecondMomentModule(tiny_gpt2(), gpt2_tokenizer, [7], corpus=["a"])


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_spawn_two_processes_equal_one_process(gpt2_tokenizer, texts, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks share 2 cores
    model = tiny_gpt2()
    model.config._name_or_path = "tiny/gpt2"
    ref = get_second_moments(model, gpt2_tokenizer, [0, 1], corpus=texts, cache=False, **KW)
    cache = tmp_path / "cache"
    out = compute_second_moments_distributed(
        model, gpt2_tokenizer, [0, 1], corpus=texts, cache=cache,
        trainer=trainer(tmp_path, devices=2, strategy="ddp_spawn"), **KW)
    for n in NAMES:
        assert out[n].count == ref[n].count and out[n].n_texts == N
        torch.testing.assert_close(out[n].mom2, ref[n].mom2, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out[n].mean, ref[n].mean, rtol=1e-12, atol=1e-14)
        tps = out[n].meta["tokens_per_sec_per_rank"]
        assert len(tps) == 2 and all(v > 0 for v in tps)
        assert out[n].meta["world_size"] == 2

    def no_compute(*args, **kwargs):
        raise AssertionError("rank 0 should have cached the statistics")

    # rank 0 saved them under the key that get_second_moments uses
    monkeypatch.setattr(collect_mod, "collect_second_moments", no_compute)
    cached = get_second_moments(model, gpt2_tokenizer, [0, 1], corpus=texts, cache=cache, **KW)
    for n in NAMES:
        assert torch.equal(cached[n].mom2_sum, out[n].mom2_sum)
    # and the distributed entry point reads it back without a Trainer run
    again = compute_second_moments_distributed(model, gpt2_tokenizer, [0, 1], corpus=texts,
                                               cache=cache, **KW)
    assert torch.equal(again[NAMES[1]].mom2_sum, out[NAMES[1]].mom2_sum)


@pytest.mark.parametrize("budget", [None, 333])
def test_rank_shards_of_the_token_stream_add_up_to_one_process(gpt2_tokenizer, texts, budget):
    kw = dict(seq_len=16, n_samples=40, n_tokens=budget)
    whole = list(iter_token_rows(texts, gpt2_tokenizer, **kw))
    parts = [list(iter_token_rows(texts, gpt2_tokenizer, rank=r, world_size=3, **kw))
             for r in range(3)]
    assert sorted(row for p in parts for row in p) == whole
    assert parts[2] == whole[2::3]
    assert sum(len(ids) for _, ids in whole) == (budget or sum(
        min(16, len(gpt2_tokenizer(t)["input_ids"])) for t in texts[:40]))
