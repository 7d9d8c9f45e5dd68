"""The statistics cache: keys, validation on read, atomic writes, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testutils import GPT2_TOKENIZER, REPO, tiny_gpt2

import lightning_rome.stats.collect as collect_mod
from lightning_rome.data.text import IterableTextCorpus, as_corpus
from lightning_rome.models import load_tokenizer
from lightning_rome.stats import (
    SecondMoment,
    get_second_moment,
    get_second_moments,
    load_second_moments,
    save_second_moments,
    stats_key,
    stats_path,
)
from lightning_rome.utils.io import CorruptFileError

KW = dict(n_samples=40, seq_len=16, batch_size=4)


@pytest.fixture(autouse=True)
def _no_memo():
    collect_mod._MEMO.clear()
    yield
    collect_mod._MEMO.clear()


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(120))


@pytest.fixture
def model():
    m = tiny_gpt2()
    m.config._name_or_path = "tiny/gpt2"
    return m


def stats_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


class CountCalls:
    """Counts forward passes of the collection loop."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = collect_mod.accumulate_batch

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(collect_mod, "accumulate_batch", counted)


def test_second_call_reads_the_cache(model, gpt2_tokenizer, texts, tmp_path, monkeypatch):
    first = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    files = stats_files(tmp_path)
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert files[0].parent.name == "tiny_gpt2"
    assert files[0].name.startswith("transformer.h.1.mlp.c_proj-n40-float64-")
    with safe_open(str(files[0]), framework="pt") as f:
        header = json.loads(f.metadata()["lightning_rome"])
        assert set(f.keys()) == {"0.mom2_sum", "0.k_sum"}
    assert header["complete"] and header["entries"][0]["count"] == first.count
    assert header["entries"][0]["key"]["module"] == "transformer.h.1.mlp.c_proj"

    def no_compute(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(collect_mod, "collect_second_moments", no_compute)
    for memory_cache in (False, True, True):
        again = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path,
                                  memory_cache=memory_cache, **KW)
        assert torch.equal(again.mom2_sum, first.mom2_sum) and again.count == first.count
    assert again.meta["key"] == header["entries"][0]["key"]


def test_memory_cache_is_bounded(model, gpt2_tokenizer, texts, tmp_path, monkeypatch):
    first = get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, cache=tmp_path, **KW)
    nbytes = first.mom2_sum.nbytes + first.k_sum.nbytes
    monkeypatch.setattr(collect_mod, "MEMORY_CACHE_BYTES", nbytes + 10)
    get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    for layer in (0, 1):
        get_second_moment(model, gpt2_tokenizer, layer, corpus=texts, cache=tmp_path, **KW)
        assert len(collect_mod._MEMO) == 1
        (kept,) = collect_mod._MEMO.values()
        assert kept.meta["module"] == f"transformer.h.{layer}.mlp.c_proj"


def test_key_separates_what_changes_the_statistics(model, gpt2_tokenizer, texts):
    def path(m=model, **kw):
        args = dict(corpus_id=as_corpus(texts).identity, n_samples=40, n_tokens=None,
                    seq_len=16, dtype=torch.float64)
        args.update(kw)
        return stats_path("/root", stats_key(m, gpt2_tokenizer, "transformer.h.1.mlp.c_proj",
                                             **args))

    base = path()
    assert base == path()
    other_weights = tiny_gpt2(seed=1)
    other_weights.config._name_or_path = "tiny/gpt2"  # same name, different checkpoint
    assert path(other_weights) != base
    assert path(n_samples=41) != base
    assert path(seq_len=17) != base
    assert path(dtype=torch.float32) != base
    assert path(corpus_id=as_corpus(texts[1:]).identity) != base
    with torch.no_grad():  # changes k for layer 1: part of the fingerprint
        model.transformer.h[1].mlp.c_fc.weight.add_(1e-3)
    assert path() != base


def test_edited_rewrite_weights_keep_their_statistics(model, gpt2_tokenizer, texts, tmp_path,
                                                      monkeypatch):
    first = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    with torch.no_grad():  # a ROME-style rank-one edit of the module's own W_out (layer 1)
        w = model.transformer.h[1].mlp.c_proj.weight  # (d_ff, d) Conv1D
        w.add_(torch.outer(torch.ones(w.shape[0]), torch.ones(w.shape[1])) * 1e-2)
    calls = CountCalls(monkeypatch)
    again = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    assert calls.calls == 0 and torch.equal(again.mom2_sum, first.mom2_sum)
    # An edit upstream (layer 0's W_out) changes layer 1's keys: recomputed (issue 18, item 4).
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.add_(1e-2)
    get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    assert calls.calls > 0


def test_recompute_overwrites(model, gpt2_tokenizer, texts, tmp_path, monkeypatch):
    get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, cache=tmp_path, **KW)
    calls = CountCalls(monkeypatch)
    get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, cache=tmp_path, recompute=True,
                      **KW)
    assert calls.calls == 10  # 40 texts in batches of 4


def corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data
    path.write_bytes(bytes(data))


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"not a safetensors file at all")


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_flip, corrupt_garbage])
def test_corrupt_file_is_detected_and_recomputed(model, gpt2_tokenizer, texts, tmp_path,
                                                 corrupt):
    first = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    (path,) = stats_files(tmp_path)
    corrupt(path)
    with pytest.raises(CorruptFileError):
        load_second_moments(path)
    with pytest.warns(UserWarning, match="invalid statistics file"):
        again = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    assert torch.equal(again.mom2_sum, first.mom2_sum)
    assert load_second_moments(path)[0].count == first.count  # repaired on disk


def test_valid_file_with_wrong_content_is_rejected(model, gpt2_tokenizer, texts, tmp_path):
    first = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    (path,) = stats_files(tmp_path)
    key = first.meta["key"]
    wrong_key = dict(key, n_samples=99)
    save_second_moments(path, [first], [wrong_key])  # checksums fine, key does not match
    with pytest.warns(UserWarning, match="other keys"):
        get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    bad = first.clone()
    bad.mom2_sum[0, 0] = float("nan")
    save_second_moments(path, [bad], [key])
    with pytest.warns(UserWarning, match="non-finite"):
        again = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=tmp_path, **KW)
    assert torch.equal(again.mom2_sum, first.mom2_sum)
    short = SecondMoment(first.mom2_sum[:3, :3].clone(), first.count, None, 40, {})
    save_second_moments(path, [short], [dict(key, dtype="float32")])
    with pytest.raises(CorruptFileError, match="float64, key says float32"):
        load_second_moments(path)


def test_uncacheable_corpus_warns_and_computes(model, gpt2_tokenizer, texts, tmp_path):
    once = IterableTextCorpus(t for t in texts[:10])
    with pytest.warns(UserWarning, match="not cached"):
        stats = get_second_moment(model, gpt2_tokenizer, 0, corpus=once, cache=tmp_path,
                                  n_samples=10, seq_len=8)
    assert stats.n_texts == 10 and not stats_files(tmp_path)


# --------------------------------------------------------------------------------------------
# Interruption and resume
# --------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def flaky_corpus(texts, fail_at):
    """The same stream each time, except that the first read raises at text ``fail_at``."""
    state = {"reads": 0}

    def stream():
        state["reads"] += 1
        for i, t in enumerate(texts):
            if state["reads"] == 1 and i == fail_at:
                raise Interrupted(f"simulated crash at text {i}")
            yield t

    return IterableTextCorpus(stream, name="flaky")


def test_interrupted_run_resumes_to_the_same_result(model, gpt2_tokenizer, texts, tmp_path,
                                                    monkeypatch):
    kw = dict(n_samples=100, seq_len=16, batch_size=4, checkpoint_every=10)
    names = [0, 1]
    clean = get_second_moments(model, gpt2_tokenizer, names, corpus=texts, cache=False, **kw)
    corpus = flaky_corpus(texts, fail_at=57)
    with pytest.raises(Interrupted):
        get_second_moments(model, gpt2_tokenizer, names, corpus=corpus, cache=tmp_path, **kw)
    (partial,) = stats_files(tmp_path)
    assert partial.name.startswith("partial-")
    saved = load_second_moments(partial, complete=False)
    # texts are sorted in windows of checkpoint_every = 10: checkpoints after 10, 20, ..., 50
    assert [m.n_texts for m in saved] == [50, 50]
    calls = CountCalls(monkeypatch)
    resumed = get_second_moments(model, gpt2_tokenizer, names, corpus=corpus, cache=tmp_path,
                                 **kw)
    assert all(texts[:100])  # so each window of 10 texts is 3 batches of at most 4
    assert calls.calls == (100 - 50) // 10 * 3  # only the texts after the checkpoint
    for n in clean:
        assert torch.equal(resumed[n].mom2_sum, clean[n].mom2_sum)  # bit for bit
        assert torch.equal(resumed[n].k_sum, clean[n].k_sum)
        assert resumed[n].count == clean[n].count and resumed[n].n_texts == 100
    files = stats_files(tmp_path)
    assert len(files) == 2 and not any(f.name.startswith("partial-") for f in files)


def test_corrupt_checkpoint_starts_over(model, gpt2_tokenizer, texts, tmp_path):
    kw = dict(n_samples=40, seq_len=16, batch_size=4, checkpoint_every=8)
    clean = get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, cache=False, **kw)
    with pytest.raises(Interrupted):
        get_second_moment(model, gpt2_tokenizer, 0, corpus=flaky_corpus(texts, 30),
                          cache=tmp_path, **kw)
    (partial,) = stats_files(tmp_path)
    corrupt_truncate(partial)
    corpus = IterableTextCorpus(texts, name="flaky")
    with pytest.warns(UserWarning, match="invalid checkpoint"):
        again = get_second_moment(model, gpt2_tokenizer, 0, corpus=corpus, cache=tmp_path, **kw)
    assert torch.equal(again.mom2_sum, clean.mom2_sum)


WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from testutils import tiny_gpt2, GPT2_TOKENIZER
    from lightning_rome.data.text import IterableTextCorpus, as_corpus
    from lightning_rome.models import load_tokenizer
    from lightning_rome.stats import get_second_moment

    texts = list(as_corpus("wikitext-2").take(120))
    delay = float(sys.argv[2])

    def slow():
        for t in texts:
            time.sleep(delay)
            yield t

    model = tiny_gpt2()
    model.config._name_or_path = "tiny/gpt2"
    stats = get_second_moment(model, load_tokenizer(GPT2_TOKENIZER), 1,
                              corpus=IterableTextCorpus(slow, name="slow"), n_samples=120,
                              seq_len=16, batch_size=4, checkpoint_every=8, cache=sys.argv[1],
                              progress=False)
    print("DONE", stats.count, flush=True)
""")


def run_worker(tmp_path: Path, cache: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(script), str(cache), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_mid_run_then_resume(model, gpt2_tokenizer, texts, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    proc = run_worker(tmp_path, cache, delay=0.05)
    deadline = time.time() + 180
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in cache.rglob("partial-*.safetensors")] if cache.exists() else []
        if found and load_second_moments(found[0], complete=False)[0].n_texts >= 24:
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = load_second_moments(partial, complete=False)[0].n_texts
    assert 24 <= done_before < 120
    assert not [p for p in cache.rglob("*.safetensors") if not p.name.startswith("partial-")]
    kw = dict(n_samples=120, seq_len=16, batch_size=4, checkpoint_every=8)
    calls = CountCalls(monkeypatch)
    resumed = get_second_moment(model, gpt2_tokenizer, 1, corpus=IterableTextCorpus(
        texts, name="slow"), cache=cache, **kw)
    assert calls.calls == -(-(120 - done_before) // 4)
    clean = get_second_moment(model, gpt2_tokenizer, 1, corpus=texts, cache=False, **kw)
    assert torch.equal(resumed.mom2_sum, clean.mom2_sum) and resumed.count == clean.count


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_at_once_leave_one_valid_file(gpt2_tokenizer, texts, tmp_path):
    cache = tmp_path / "cache"
    procs = [run_worker(tmp_path, cache, delay=0.002) for _ in range(2)]
    outs = [p.communicate(timeout=200) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = {o[0].split()[-1] for o in outs}
    assert len(counts) == 1
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(files) == 1 and not files[0].name.startswith("partial-")
    (m,) = load_second_moments(files[0])
    assert str(m.count) in counts


def test_two_threads_at_once_leave_one_valid_file(gpt2_tokenizer, texts, tmp_path):
    kw = dict(n_samples=60, seq_len=16, batch_size=2, checkpoint_every=4)
    results, errors = {}, []
    models = [tiny_gpt2() for _ in range(2)]  # each thread hooks its own copy of the weights
    toks = [load_tokenizer(GPT2_TOKENIZER) for _ in range(2)]  # fast tokenizers: not shareable
    for m in models:
        m.config._name_or_path = "tiny/gpt2"

    def work(i):
        try:
            results[i] = get_second_moment(models[i], toks[i], 1, corpus=texts, cache=tmp_path,
                                           memory_cache=False, **kw)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid file" warnings from half-written files
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    files = stats_files(tmp_path)
    assert len(files) == 1 and not files[0].name.startswith("partial-")
    (on_disk,) = load_second_moments(files[0])
    assert torch.equal(results[0].mom2_sum, results[1].mom2_sum)
    assert torch.equal(on_disk.mom2_sum, results[0].mom2_sum)
