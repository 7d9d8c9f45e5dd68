"""The sequential-editing benchmark core: the curve, resuming after an interruption, keying."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from testutils import REPO

from lightning_rome.editing import AlphaEdit
from lightning_rome.evaluation import (
    SequentialInterrupt,
    SequentialSettings,
    fact_model_benchmark,
    load_curve,
    run_key,
    run_sequential,
)
from lightning_rome.testing import get_fact_model
from lightning_rome.utils.io import tensor_checksum

HP = {"layers": [1], "fact_token": "last", "v_num_grad_steps": 10, "clamp_norm_factor": 12.0,
      "v_weight_decay": 0.01, "context_template_lengths": [[6, 2]],
      "context_template_starts": None, "key_average": "templates", "mom2_n_samples": 2000,
      "nullspace_threshold": 2e-2, "l2_weight": 1.0}
SETTINGS = SequentialSettings(batch_size=1, eval_every=2, max_new_tokens=8, seed=3)


class Recording:
    """An editor wrapper that records which requests it was asked to edit."""

    def __init__(self, editor):
        self.inner, self.calls = editor, []
        self.method, self.hparams = editor.method, editor.hparams

    def edit(self, model, tok, requests):
        self.calls.append([r.subject for r in requests])
        return self.inner.edit(model, tok, requests)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.fixture(scope="module")
def fm():
    return get_fact_model()


@pytest.fixture(scope="module")
def bench(fm):
    cases, retain, fluency = fact_model_benchmark(fm, 5, n_retain_subjects=10, n_fluency=2)
    return cases, retain, fluency


def _checksums(model):
    return {n: tensor_checksum(p) for n, p in model.named_parameters()}


def _strip(points):
    return [{k: v for k, v in p.items() if k != "edit_seconds"} for p in points]


def _run(fm, bench, folder, **kw):
    cases, retain, fluency = bench
    editor = Recording(AlphaEdit(HP, corpus=list(fm.kb.text_corpus())))
    res = run_sequential(fm.model, fm.tokenizer, editor, cases, retain=retain,
                         fluency_prompts=fluency, settings=SETTINGS, results_dir=folder, **kw)
    return res, editor


def test_interrupted_run_resumes_to_the_same_curve_without_redoing_batches(fm, bench, tmp_path):
    cases = bench[0]
    before = _checksums(fm.model)
    full, ed_full = _run(fm, bench, tmp_path / "full")
    assert _checksums(fm.model) == before  # restored bit-exactly
    assert [p["batches"] for p in full.points] == [0, 2, 4, 5]
    assert [p["edits"] for p in full.points] == [0, 2, 4, 5]
    assert len(ed_full.calls) == 5 and full.batches_run == 5
    p0 = full.points[0]
    assert p0["efficacy"] is None and p0["update_norm"] == 0.0 and p0["retain_accuracy"] > 0.9
    assert all(p["update_norm"] > 0 for p in full.points[1:])
    assert full.points[-1]["efficacy"] >= 0.6 and p0["fluency"] > 0

    with pytest.raises(SequentialInterrupt):
        _run(fm, bench, tmp_path / "cut", stop_after=3)
    assert _checksums(fm.model) == before
    partial = load_curve(tmp_path / "cut")
    assert not partial["complete"] and [p["batches"] for p in partial["points"]] == [0, 2]
    resumed, ed_res = _run(fm, bench, tmp_path / "cut")
    assert _checksums(fm.model) == before
    # One warm-up edit of the first batch on the unedited model (discarded), then batches 4, 5.
    assert ed_res.calls == [[cases[0].request.subject], [cases[3].request.subject],
                            [cases[4].request.subject]]
    assert resumed.batches_run == 2
    assert _strip(resumed.points) == _strip(full.points)
    assert _strip(load_curve(tmp_path / "cut")["points"]) == _strip(full.points)
    assert load_curve(tmp_path / "cut")["complete"]
    # A finished run is not redone.
    again, ed_again = _run(fm, bench, tmp_path / "cut")
    assert ed_again.calls == [] and _strip(again.points) == _strip(full.points)


def test_a_folder_of_another_run_is_refused(fm, bench, tmp_path):
    cases, retain, _ = bench
    editor = AlphaEdit(HP, corpus=list(fm.kb.text_corpus()))
    run_sequential(fm.model, fm.tokenizer, editor, cases[:1], retain=retain[:3],
                   settings=SETTINGS, results_dir=tmp_path)
    other = AlphaEdit({**HP, "l2_weight": 2.0}, corpus=list(fm.kb.text_corpus()))
    with pytest.raises(ValueError, match=r"another sequential run.*editor"):
        run_sequential(fm.model, fm.tokenizer, other, cases[:1], retain=retain[:3],
                       settings=SETTINGS, results_dir=tmp_path)
    # Damaged curve files are detected.
    path = tmp_path / "curve.json"
    data = json.loads(path.read_text())
    data["points"][0]["retain_accuracy"] = 0.0
    path.write_text(json.dumps(data))
    from lightning_rome.utils.io import CorruptFileError

    with pytest.raises(CorruptFileError):
        load_curve(tmp_path)


def test_run_key_covers_weights_data_editor_settings(fm, bench):
    cases, retain, fluency = bench
    ed = AlphaEdit(HP)
    base = run_key(fm.model, fm.tokenizer, ed, cases, retain, fluency, SETTINGS)
    assert base["version"] >= 1
    assert run_key(fm.model, fm.tokenizer, ed, cases[:-1], retain, fluency, SETTINGS) != base
    assert run_key(fm.model, fm.tokenizer, AlphaEdit({**HP, "l2_weight": 3.0}), cases, retain,
                   fluency, SETTINGS) != base
    assert run_key(fm.model, fm.tokenizer, ed, cases, retain, fluency,
                   replace(SETTINGS, batch_size=2)) != base
    # checkpoint_every changes no number, so not the key.
    assert run_key(fm.model, fm.tokenizer, ed, cases, retain, fluency,
                   replace(SETTINGS, checkpoint_every=3)) == base
    w = fm.model.get_parameter("transformer.h.3.mlp.c_fc.weight")
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] += 1.0
    try:
        assert run_key(fm.model, fm.tokenizer, ed, cases, retain, fluency, SETTINGS) != base
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        SequentialSettings(batch_size=0)
    with pytest.raises(ValueError, match="eval_every"):
        SequentialSettings(eval_every=0)


def test_the_core_imports_no_lightning():
    code = ("import sys, lightning_rome.evaluation, lightning_rome.editing.alphaedit; "
            "print(any(m.split('.')[0] == 'lightning' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
