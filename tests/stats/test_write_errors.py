"""Issue 18, item 10: a write error (a full disk) while caching statistics or MEMIT's z keeps
the computed result, used uncached, with one warning naming the file and the error; a caller
that needs the file gets a one-line ``CacheWriteError``."""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from safetensors import SafetensorError
from testutils import GPT2_TOKENIZER, tiny_gpt2

import lightning_rome.stats.cache as cache_mod
import lightning_rome.stats.collect as collect_mod
from lightning_rome.data.text import as_corpus
from lightning_rome.editing import MEMIT
from lightning_rome.models import load_tokenizer
from lightning_rome.requests import EditRequest
from lightning_rome.stats import SecondMoment, get_second_moment, save_second_moments
from lightning_rome.stats.cache import CacheWriteError

KW = dict(n_samples=24, seq_len=16, batch_size=4)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER)


@pytest.fixture(scope="module")
def texts():
    return list(as_corpus("wikitext-2").take(40))


@pytest.fixture(autouse=True)
def _fresh():
    collect_mod._MEMO.clear()
    cache_mod._WARNED_WRITE.clear()
    yield
    collect_mod._MEMO.clear()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                          'message: "No space left on device" })')


@pytest.mark.parametrize("fail", [_disk_full, _safetensors_full])
def test_full_disk_keeps_the_statistics(fail, tok, texts, tmp_path, monkeypatch):
    model = tiny_gpt2()
    expected = get_second_moment(model, tok, 1, corpus=texts, cache=False, **KW)
    monkeypatch.setattr(cache_mod, "save_file", fail)
    with pytest.warns(UserWarning, match=r"could not write.*statistics.*transformer\.h\.1"
                                         r".*No space left on device.*not cached"):
        got = get_second_moment(model, tok, 1, corpus=texts, cache=tmp_path,
                                checkpoint_every=4, **KW)
    torch.testing.assert_close(got.mom2, expected.mom2, rtol=0, atol=0)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial files left


def test_checkpoint_write_errors_warn_once(tok, texts, tmp_path, monkeypatch):
    model = tiny_gpt2()
    monkeypatch.setattr(cache_mod, "save_file", _disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_second_moment(model, tok, 0, corpus=texts, cache=tmp_path, checkpoint_every=4, **KW)
    msgs = [str(w.message) for w in caught if "could not write" in str(w.message)]
    # one for the checkpoint file (written 6 times), one for the final file
    assert len(msgs) == 2, msgs
    assert sum("partial-" in m for m in msgs) == 1


def test_strict_write_raises_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "save_file", _disk_full)
    m = SecondMoment(torch.eye(3, dtype=torch.float64), 5, torch.ones(3, dtype=torch.float64), 5)
    path = tmp_path / "x.safetensors"
    with pytest.raises(CacheWriteError) as err:
        save_second_moments(path, [m], [{"dtype": "float64"}], on_error="raise")
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "No space left" in text
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert not path.exists()
    # the default: a warning and False
    with pytest.warns(UserWarning, match="could not write"):
        assert save_second_moments(path, [m], [{"dtype": "float64"}]) is False


def test_memit_z_cache_write_error_keeps_z(tok, tmp_path, monkeypatch):
    import lightning_rome.editing.memit as memit_mod

    def sm(model, tok, name):
        d = model.get_submodule(name).weight.shape[0]
        return torch.eye(d, dtype=torch.float64)

    model = tiny_gpt2()
    req = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")
    hp = {"layers": [1], "v_num_grad_steps": 2, "context_templates": ["{}"]}
    expected = MEMIT(hp, second_moment=sm).compute_z(model, tok, [req])
    monkeypatch.setattr(cache_mod, "save_file", _disk_full)
    monkeypatch.setattr(memit_mod, "save_file", _disk_full, raising=False)
    memit = MEMIT({**hp, "z_cache": str(tmp_path)}, second_moment=sm)
    with pytest.warns(UserWarning, match=r"could not write.*z.*No space left"):
        z = memit.compute_z(model, tok, [req])
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_stats_job_output_file_write_error_is_a_one_line_error(tok, texts, tmp_path,
                                                               monkeypatch):
    """The file the user asked for (``output_path``) cannot be skipped: a one-line
    ``CacheWriteError`` (an ``OSError``, which the CLI reports as one line)."""
    import lightning.pytorch as L

    from lightning_rome.modules.stats import SecondMomentModule

    out = tmp_path / "out.safetensors"
    module = SecondMomentModule(tiny_gpt2(), tok, [0], corpus=texts, cache=False,
                                output_path=out, **KW)
    monkeypatch.setattr(cache_mod, "save_file", _disk_full)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(CacheWriteError, match=r"could not write.*out\.safetensors.*No space"):
        trainer.predict(module, return_predictions=False)
    assert not out.exists()
