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


def test_sample_generations_are_logged_as_text(lm, tmp_path):
    """generation=True: a TensorBoard text table of the first cases' generations, the prompt
    and the continuation before and after the edit, from the run's own records; with
    editor=None one column, the unedited model's."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_eval_callback import _texts
    from test_evaluator import make_case

    from lightning_rome.modules.evaluator import CaseResultsFile

    model, tok = lm
    cases = [make_case(i, s, "{} plays the", "piano", "guitar", gen=(f"{s} is known for",))
             for i, s in enumerate(["Toko Yasuda", "Danielle Darrieux", "Paul Klee"])]
    gen = {"max_new_tokens": 4}

    def run(editor, name):
        logger = TensorBoardLogger(tmp_path, name=name, default_hp_metric=False)
        ev = EditEvaluator(model, tok, editor, generation=True, generation_kwargs=gen,
                           generation_samples=2, results_dir=tmp_path / name / "res",
                           verbose=False)
        trainer(tmp_path, logger=logger).test(ev, datamodule=_gen_datamodule(tmp_path / name,
                                                                             cases))
        records, _ = CaseResultsFile.read(tmp_path / name / "res" / "cases.rank0.jsonl")
        return _texts(logger.log_dir), {r["case_id"]: r for r in records}

    texts, records = run(FixedEditor(scale=3.0), "fixed")
    lines = texts["generations/fixed"].splitlines()
    assert lines[0] == "| case | prompt | before | after |"
    assert len(lines) == 2 + 2  # generation_samples=2 cases of one prompt each
    for line, cid in zip(lines[2:], (0, 1)):
        r, prompt = records[cid], cases[cid].generation_prompts[0]
        want = [" ".join(r[p]["generation"]["texts"][0][len(prompt):].split())
                for p in ("pre", "post")]
        assert [c.strip() for c in line.strip("|").split(" | ")] == [str(cid), prompt, *want]
    assert "summary/fixed" in texts
    texts, records = run(None, "none")
    lines = texts["generations/none"].splitlines()
    assert lines[0] == "| case | prompt | unedited |"
    prompt = cases[0].generation_prompts[0]
    assert lines[2].split(" | ")[-1].rstrip(" |") == " ".join(
        records[0]["pre"]["generation"]["texts"][0][len(prompt):].split())


def _gen_datamodule(folder, cases):
    """Test dataloaders of ``cases`` as they are (with their generation prompts)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_rome.records import collate_records

    class DM(pl.LightningDataModule):
        def test_dataloader(self):
            return DataLoader(cases, batch_size=2, collate_fn=collate_records)

    return DM()
