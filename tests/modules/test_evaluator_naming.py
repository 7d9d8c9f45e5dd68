"""What ``EditEvaluator`` logs: the unedited model under ``pre/`` only, no per-batch scalars,
and a warning when no edit took at all (ES 0 on every case: settings that do not fit)."""

from __future__ import annotations

import warnings

import pytest
from lightning.pytorch.loggers import CSVLogger
from test_evaluator import (  # noqa: F401
    CASES,
    FixedEditor,
    _run,
    cf_datamodule,
    hand_cf_metrics,
    one_thread,
    trainer,
)
from tiny_factories import tiny_model

from lightning_rome.modules.evaluator import EditEvaluator, evaluate_cases
from lightning_rome.patches import LowRankDelta, WeightPatch

PARAM = "transformer.h.1.mlp.c_proj.weight"


@pytest.fixture
def lm(gpt2_tokenizer):
    """The evaluator tests' model: a 2-layer, width-32 GPT-2 with a wide init."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.2,
                       n_positions=128)
    return model, gpt2_tokenizer


class NullEditor:
    """An 'edit' that changes nothing (a zero delta): what settings that miss the fact do."""

    method = "null"

    def edit(self, model, tokenizer, requests):
        (req,) = requests
        w = model.get_parameter(PARAM)
        import torch

        zero = LowRankDelta(torch.zeros(w.shape[1], 1), torch.zeros(1, w.shape[0]))
        return WeightPatch.from_model(model, {PARAM: zero}, method="null", requests=[req])


def test_unedited_model_is_logged_as_pre_only(lm, tmp_path):
    model, tok = lm
    ev = EditEvaluator(model, tok, None, results_dir=tmp_path / "res", verbose=False)
    tr = trainer(tmp_path, logger=CSVLogger(tmp_path, name="logs"))
    tr.test(ev, datamodule=cf_datamodule(tmp_path, CASES[:2]))
    logged = set(tr.callback_metrics)
    assert {"pre/ES", "pre/NS", "pre/S"} <= logged
    assert not any(k.startswith("post/") or k.endswith("_batch") for k in logged), logged
    assert ev.results["post"] == {} and set(ev.results["pre"]) >= {"pre/ES", "pre/NS"}
    hand = hand_cf_metrics(model, tok, CASES[:2])
    for key in ("ES", "PS", "NS", "EM"):
        assert ev.results["pre"][f"pre/{key}"]["mean"] == pytest.approx(hand[key], rel=1e-4,
                                                                       abs=1e-12)
    assert "| none " in ev.results["table"] and "pre-edit" not in ev.results["table"]


def test_an_editor_is_logged_as_pre_and_post_without_batch_scalars(lm, tmp_path):
    model, tok = lm
    ev = _run(model, tok, tmp_path, FixedEditor(scale=3.0), cases=CASES[:2])
    assert set(ev.results["post"]) >= {"post/ES", "post/NS"} and ev.results["pre"]
    assert not any(k.endswith("_batch") for k in ev.trainer.callback_metrics)


def test_efficacy_zero_on_every_case_warns(lm, tmp_path):
    model, tok = lm
    # The cases where the unedited model prefers the true object: a null edit leaves ES 0.
    records = evaluate_cases(model, tok, CASES, None)
    zero = [c for c, r in zip(CASES, records)
            if all(a < b for a, b in zip(r["pre"]["rewrite"]["p_new"],
                                         r["pre"]["rewrite"]["p_true"]))]
    assert zero
    with pytest.warns(UserWarning, match=f"efficacy is 0 on all {len(zero)} cases.*do not fit "
                      "this model.*--hparams, --layer"):
        ev = _run(model, tok, tmp_path / "null", NullEditor(), cases=zero)
    assert ev.results["post"]["post/ES"]["mean"] == 0.0
    with warnings.catch_warnings():  # an edit that takes on some case: no such warning
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!.*efficacy is 0)")
        ev = _run(model, tok, tmp_path / "fixed", FixedEditor(scale=3.0), cases=CASES)
    assert ev.results["post"]["post/ES"]["mean"] > 0.0


def test_a_method_name_without_hparams_gets_settings_for_the_model(lm):
    from lightning_rome.presets import PresetNotice

    model, tok = lm  # 2 layers: GPT-2 XL's layer 17 would be out of range
    with pytest.warns(PresetNotice, match="derived from its depth: layer 0"):
        ev = EditEvaluator(model, tok, "rome")
    assert ev.editor.hparams.layer == 0
