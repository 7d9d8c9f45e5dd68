"""Faults: every cache and results file that is truncated, corrupted or altered is detected and
then recomputed (with a warning) or refused with a clear error, never silently used; two
processes computing the same statistics at once leave one valid file.

Expected values come from fresh computations without any cache. Cases already covered elsewhere
are not repeated here: tests/stats/test_stats_cache.py (truncated, flipped and garbage statistics
files, NaN and wrong-key files, a corrupt checkpoint, SIGKILL and resume), tests/test_patches.py
(truncated patches, every flipped byte), tests/reliability/test_security.py (tampered patch
headers), tests/modules/test_evaluator.py (a cut last line, an altered value),
tests/editing/test_memit_math.py (a truncated z file), tests/testing/test_fact_model.py (a
truncated weights file, a missing or foreign manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from testutils import REPO, tiny_gpt2

from lightning_rome.stats import (
    SecondMoment,
    get_second_moment,
    get_second_moments,
    load_second_moments,
    save_second_moments,
)
from lightning_rome.utils.io import CorruptFileError

KW = dict(n_samples=24, seq_len=12, batch_size=4, memory_cache=False)
TEXTS = [f"Fact number {i}: the city of Town{i} lies on river {i % 7} near hill {i * 3}."
         for i in range(40)]


@pytest.fixture(scope="module")
def model():
    m = tiny_gpt2(seed=3)
    m.config._name_or_path = "tiny/faults"
    return m


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def fresh(model, tok, layer=1, **kw):
    """The statistics computed without any cache: the reference."""
    return get_second_moment(model, tok, layer, corpus=TEXTS, cache=False, **{**KW, **kw})


def rewrite(path: Path, *, tensors=None, header=None, keep_sha: bool = True) -> None:
    """Write ``path`` again with some tensors and/or header fields replaced, keeping the other
    metadata entries (e.g. a header checksum) as they were."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if tensors:
        data.update(tensors)
    if header is not None:
        h = json.loads(meta["lightning_rome"])
        header(h)
        meta["lightning_rome"] = json.dumps(h)
    if not keep_sha:
        meta = {k: v for k, v in meta.items() if k == "lightning_rome"}
    save_file(data, str(path), metadata=meta)


# ------------------------------------------------------------------------ statistics cache
def _double_count(h):
    h["entries"][0]["count"] *= 2  # C = Σ kkᵀ / count would silently halve


def _more_texts(h):
    h["entries"][0]["n_texts"] += 4


STATS_DAMAGE = {
    "zero-length": lambda p: p.write_bytes(b""),
    "header-length-only": lambda p: p.write_bytes(p.read_bytes()[:8]),
    "last-byte-cut": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "tensor-wrong-shape": lambda p: rewrite(p, tensors={"0.mom2_sum": torch.eye(5).double()}),
    "tensor-nan": lambda p: rewrite(p, tensors={
        "0.k_sum": torch.full_like(load_file(str(p))["0.k_sum"], float("nan"))}),
    "count-altered": lambda p: rewrite(p, header=_double_count),
    "n_texts-altered": lambda p: rewrite(p, header=_more_texts),
}


@pytest.mark.parametrize("damage", sorted(STATS_DAMAGE))
def test_damaged_statistics_file_is_recomputed(damage, model, gpt2_tokenizer, tmp_path):
    get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path, **KW)
    (path,) = files_under(tmp_path)
    STATS_DAMAGE[damage](path)
    with pytest.raises(CorruptFileError):
        load_second_moments(path)
    with pytest.warns(UserWarning, match="invalid statistics file"):
        again = get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path, **KW)
    ref = fresh(model, gpt2_tokenizer)
    assert torch.equal(again.mom2_sum, ref.mom2_sum) and torch.equal(again.k_sum, ref.k_sum)
    assert again.count == ref.count and torch.equal(again.mom2, ref.mom2)
    (repaired,) = load_second_moments(path)  # the file was replaced by a valid one
    assert torch.equal(repaired.mom2_sum, ref.mom2_sum) and repaired.count == ref.count


def test_every_header_byte_and_sampled_data_bytes_are_checked(model, gpt2_tokenizer, tmp_path):
    """A flipped byte anywhere in the safetensors header (lengths, offsets, dtypes, the JSON
    metadata with counts and keys) or in the tensor data makes the file invalid."""
    get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path, **KW)
    (path,) = files_under(tmp_path)
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    positions = list(range(header_end)) + list(range(header_end, len(raw), 509))
    undetected = []
    for i in positions:
        bad = bytearray(raw)
        bad[i] ^= 0x01 if i % 2 else 0xFF
        path.write_bytes(bytes(bad))
        try:
            load_second_moments(path)
        except CorruptFileError:
            continue
        undetected.append((i, raw[max(0, i - 20):i + 20]))
    assert not undetected, undetected[:5]


def test_wrong_size_statistics_with_valid_checksums_are_recomputed(model, gpt2_tokenizer,
                                                                     tmp_path):
    """A self-consistent file (checksums fine, right key) whose matrix has the wrong size for
    the module is not used."""
    first = get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path, **KW)
    (path,) = files_under(tmp_path)
    small = SecondMoment(first.mom2_sum[:5, :5].clone(), first.count, first.k_sum[:5].clone(),
                         first.n_texts, {})
    save_second_moments(path, [small], [first.meta["key"]])
    with pytest.warns(UserWarning, match="invalid statistics file"):
        again = get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path, **KW)
    assert again.mom2_sum.shape == first.mom2_sum.shape
    assert torch.equal(again.mom2_sum, fresh(model, gpt2_tokenizer).mom2_sum)


class Crash(Exception):
    pass


def _crashing(texts, at):
    def gen():
        for i, t in enumerate(texts):
            if i == at:
                raise Crash
            yield t
    return gen


@pytest.mark.parametrize("damage", ["n_texts", "shape", "flip"])
def test_damaged_checkpoint_starts_over(damage, model, gpt2_tokenizer, tmp_path):
    """A resumable checkpoint whose header or tensors were altered is not resumed from."""
    from lightning_rome.data.text import IterableTextCorpus

    kw = dict(KW, checkpoint_every=8)
    names = [0, 1]
    with pytest.raises(Crash):
        get_second_moments(model, gpt2_tokenizer, names, corpus=IterableTextCorpus(
            _crashing(TEXTS, 18), name="crashy"), cache=tmp_path, **kw)
    (partial,) = files_under(tmp_path)
    assert partial.name.startswith("partial-")
    saved = load_second_moments(partial, complete=False)
    if damage == "n_texts":  # resuming from it would skip texts that were never read
        rewrite(partial, header=lambda h: [e.update(n_texts=e["n_texts"] + 4)
                                           for e in h["entries"]])
    elif damage == "shape":  # self-consistent, but not this module's size
        small = [SecondMoment(m.mom2_sum[:3, :3].clone(), m.count, m.k_sum[:3].clone(),
                              m.n_texts, {}) for m in saved]
        save_second_moments(partial, small, [m.meta["key"] for m in saved], complete=False)
    else:
        raw = bytearray(partial.read_bytes())
        raw[-9] ^= 0x10
        partial.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="invalid checkpoint"):
        again = get_second_moments(model, gpt2_tokenizer, names, corpus=IterableTextCorpus(
            TEXTS, name="crashy"), cache=tmp_path, **kw)
    ref = get_second_moments(model, gpt2_tokenizer, names, corpus=TEXTS, cache=False, **kw)
    for n in ref:
        assert torch.equal(again[n].mom2_sum, ref[n].mom2_sum)
        assert again[n].count == ref[n].count
    assert not [p for p in files_under(tmp_path) if p.name.startswith("partial-")]


# ------------------------------------------------------------------------ two processes at once
_WORKER = textwrap.dedent("""
    import sys, time, pathlib
    import torch
    torch.set_num_threads(1)
    from lightning_rome.models import load_model
    from lightning_rome.stats import get_second_moment
    model_dir, cache, go, texts = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
    model, tok = load_model(model_dir)
    texts = pathlib.Path(texts).read_text().splitlines()
    deadline = time.time() + 120
    while not go.exists() and time.time() < deadline:  # start both passes together
        time.sleep(0.01)
    m = get_second_moment(model, tok, 1, corpus=texts, cache=cache, n_samples=40, seq_len=12,
                          batch_size=2, checkpoint_every=2, memory_cache=False, progress=False)
    print("COUNT", m.count, flush=True)
""")


@pytest.mark.slow  # two interpreters importing torch: about 30 s on two shared cores
@pytest.mark.timeout(240)
def test_two_processes_computing_the_same_statistics(gpt2_tokenizer, tmp_path):
    from lightning_rome.models import load_model

    model_dir, cache, go = tmp_path / "model", tmp_path / "cache", tmp_path / "go"
    m = tiny_gpt2(seed=4)
    m.save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(model_dir), str(cache),
                               str(go), str(texts)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=200) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("invalid" not in err for _, err in outs), outs  # no half-written file was read

    files = files_under(cache)
    assert len(files) == 1, files  # one statistics file: no partial-*, no .*.tmp left behind
    assert not files[0].name.startswith(("partial-", "."))
    (on_disk,) = load_second_moments(files[0])
    model, tok = load_model(model_dir)
    ref = get_second_moment(model, tok, 1, corpus=TEXTS, cache=False, n_samples=40, seq_len=12,
                            batch_size=2)
    assert torch.equal(on_disk.mom2_sum, ref.mom2_sum) and torch.equal(on_disk.k_sum, ref.k_sum)
    assert on_disk.count == ref.count
    assert {o.split()[-1] for o, _ in outs} == {str(ref.count)}


# ------------------------------------------------------------------------ MEMIT's z cache
REQS = [{"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"},
        {"prompt": "The capital of {} is", "subject": "Westland", "target_new": "Rome"}]


def _memit(z_cache):
    from lightning_rome.editing.memit import MEMIT

    d_ff = 128
    C = torch.eye(d_ff, dtype=torch.float64) * 0.5  # a fixed C: no corpus statistics needed
    hp = {"layers": [1], "v_num_grad_steps": 3, "context_templates": ["{}"],
          "clamp_norm_factor": 4.0, "mom2_update_weight": 50.0, "z_batch_size": 1,
          "z_cache": z_cache}
    return MEMIT(hp, second_moment=lambda model, tok, module: C)


def _d() -> int:
    return 32  # tiny_gpt2's n_embd


Z_DAMAGE = {
    "zero-length": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"\x00garbage" * 20),
    "wrong-shape": lambda p: save_file({"z": torch.zeros(_d() + 1)}, str(p)),
    "nan": lambda p: save_file({"z": torch.full((_d(),), float("nan"))}, str(p)),
    "wrong-name": lambda p: save_file({"v": load_file(str(p))["z"]}, str(p)),
    "flipped-data-byte": lambda p: p.write_bytes(
        p.read_bytes()[:-5] + bytes([p.read_bytes()[-5] ^ 0x40]) + p.read_bytes()[-4:]),
}


@pytest.mark.parametrize("damage", sorted(Z_DAMAGE))
def test_damaged_z_cache_file_is_recomputed(damage, tmp_path):
    from testutils import GPT2_TOKENIZER

    from lightning_rome import EditRequest
    from lightning_rome.models import load_tokenizer

    model = tiny_gpt2(n_layer=3, seed=2)
    tok = load_tokenizer(GPT2_TOKENIZER)
    reqs = [EditRequest(**r) for r in REQS]
    reference = _memit(False).edit(model, tok, reqs)  # no cache at all
    memit = _memit(str(tmp_path))
    memit.edit(model, tok, reqs)
    files = sorted(tmp_path.glob("z-*.safetensors"))
    assert len(files) == 2
    Z_DAMAGE[damage](files[0])
    with pytest.warns(UserWarning, match="corrupt z-vector cache"):
        patch = memit.edit(model, tok, reqs)
    assert memit.last_stats["z_cached"] == 1
    for name in reference.names:
        assert torch.equal(patch.dense(name), reference.dense(name))
    assert load_file(str(files[0]))["z"].shape == (_d(),)  # rewritten with a valid z


# ------------------------------------------------------------------------ patch files
def _patch():
    from lightning_rome.patches import LowRankDelta, WeightPatch

    m = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(1, 128, generator=g))
    return WeightPatch.from_model(m, {"transformer.h.0.mlp.c_proj.weight": delta}, method="x")


def test_patch_file_with_trailing_bytes_or_of_another_kind_is_refused(model, gpt2_tokenizer,
                                                                      tmp_path):
    from lightning_rome.patches import WeightPatch

    path = _patch().save(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes() + b"\x00" * 16)  # a bad copy / concatenation
    with pytest.raises(CorruptFileError):
        WeightPatch.load(path)
    get_second_moment(model, gpt2_tokenizer, 1, corpus=TEXTS, cache=tmp_path / "s", **KW)
    (stats,) = files_under(tmp_path / "s")  # a valid lightning_rome file, but not a patch
    with pytest.raises(CorruptFileError):
        WeightPatch.load(stats)
    with pytest.raises(CorruptFileError):
        load_second_moments(_patch().save(tmp_path / "q.safetensors"))  # and the other way
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises((CorruptFileError, FileNotFoundError, IsADirectoryError)):
        WeightPatch.load(tmp_path / "dir.safetensors")


# ------------------------------------------------------------------------ evaluation JSONL
def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _evaluator_tests():
    """``tests/modules/test_evaluator.py`` (its editors, cases and runner), imported from its
    folder."""
    sys.path.insert(0, str(REPO / "tests" / "modules"))
    try:
        import test_evaluator
    finally:
        sys.path.pop(0)
    return test_evaluator


def _evaluator_model(tok):
    """The random tiny GPT-2 the evaluator tests run on."""
    from tiny_factories import tiny_model

    return tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)


def test_evaluation_results_damage_is_detected_and_redone(gpt2_tokenizer, tmp_path):
    """Damaged lines of cases.rank0.jsonl (garbage in the middle, bytes that are not UTF-8, a
    duplicate with other values, a line cut mid-write) are dropped with a warning and their
    cases evaluated again; the results equal an undamaged run's."""
    ev = _evaluator_tests()
    CountingEditor, FixedEditor, _run = ev.CountingEditor, ev.FixedEditor, ev._run
    model = _evaluator_model(gpt2_tokenizer)
    # The same editor both times (a wrapper is another editor to the results' fingerprint).
    clean = _run(model, gpt2_tokenizer, tmp_path / "clean", CountingEditor(FixedEditor()))
    path = tmp_path / "clean" / "res" / "cases.rank0.jsonl"
    lines = _lines(path)
    assert len(lines) == 4
    altered = json.loads(lines[3])
    altered["post"]["rewrite"]["p_new"][0] += 0.5  # checksum left as it was
    path.write_bytes(
        lines[0].encode()
        + b'{"format": 1, "case_id": 1, ###garbage\n'  # line 2 damaged in place
        + lines[2].encode()[:40] + b"\xff\xfe" + lines[2].encode()[42:]  # not UTF-8
        + json.dumps(altered).encode() + b"\n"
        + lines[3].encode()[:-30])  # line 5: the intact record cut mid-write
    again = CountingEditor(FixedEditor())
    with pytest.warns(UserWarning) as caught:
        resumed = _run(model, gpt2_tokenizer, tmp_path / "clean", again)
    said = " | ".join(str(w.message) for w in caught)
    for what in ("line 2: not valid JSON", "line 3", "line 4: checksum mismatch",
                 "line 5: truncated line"):
        assert what in said, said
    assert sorted(again.calls) == [1, 2, 3]  # exactly the damaged cases, once each
    assert resumed.results["post"] == clean.results["post"]
    assert resumed.results["pre"] == clean.results["pre"]
    from lightning_rome.modules.evaluator import CaseResultsFile

    records, problems = CaseResultsFile.read(path)
    assert not problems and sorted(r["case_id"] for r in records) == [0, 1, 2, 3]


def test_evaluation_damaged_run_file_is_a_clear_error(gpt2_tokenizer, tmp_path):
    ev = _evaluator_tests()
    CASES, FixedEditor, _run = ev.CASES, ev.FixedEditor, ev._run
    model = _evaluator_model(gpt2_tokenizer)
    _run(model, gpt2_tokenizer, tmp_path, FixedEditor(), cases=CASES[:2])
    run = tmp_path / "res" / "run.json"
    run.write_text(run.read_text()[:-10])  # cut mid-write
    with pytest.raises(ValueError, match="different run"):
        _run(model, gpt2_tokenizer, tmp_path, FixedEditor(), cases=CASES[:2])
    run.unlink()  # results without the settings they were computed with
    with pytest.raises(ValueError, match=r"no run\.json"):
        _run(model, gpt2_tokenizer, tmp_path, FixedEditor(), cases=CASES[:2])


# ------------------------------------------------------------------------ fact-model cache
@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json", "config.json"])
def test_fact_model_cache_with_a_flipped_byte_is_refused(victim, tmp_path):
    from lightning_rome.testing import get_fact_model
    from lightning_rome.testing.fact_model import _load

    fm = get_fact_model()  # the shared cached model (loads in about a second)
    copy = tmp_path / fm.path.name
    shutil.copytree(fm.path, copy)
    _load(fm.config, fm.kb, copy)  # the copy is valid
    target = copy / victim
    if not target.is_file():
        pytest.skip(f"the fact model has no {victim}")
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=f"{victim} is missing or altered"):
        _load(fm.config, fm.kb, copy)
