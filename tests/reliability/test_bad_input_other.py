"""Bad input to the tracer, the DataModules, the metrics and the CLI: a clear error naming the
problem, the model untouched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome.data import (
    CounterFactDataModule,
    KnownFactsDataModule,
    MalformedRecordError,
    ZsREDataModule,
)
from lightning_rome.metrics.functional import edit_score, efficacy_score, zsre_accuracy
from lightning_rome.models.checks import IncompatibleInputError
from lightning_rome.tracing import trace
from lightning_rome.utils.io import CorruptFileError

from .helpers import assert_unchanged, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from cf_fixtures import rome_case

# ----------------------------------------------------------------------------- tracer
TRACE_CASES = [
    ("subject-absent", ("Paris is nice", "Rome", {}), ValueError, r"'Rome' does not occur"),
    ("two-braces", ("{} and {} are", "Rome", {}), ValueError, r"exactly once"),
    ("subject-empty", ("{} is", "", {}), ValueError, r"subject is empty"),
    ("subject-not-str", ("{} is", 5, {}), TypeError, r"subject must be a str.*int"),
    ("window-0", ("{} is", "Rome", {"window": 0}), ValueError, r"window must be"),
    ("window-too-big", ("{} is", "Rome", {"kind": "mlp", "window": 9}), ValueError, r"window"),
    ("samples-0", ("{} is", "Rome", {"samples": 0}), ValueError, r"samples must be"),
    ("unknown-kind", ("{} is", "Rome", {"kind": "mlpx"}), ValueError, r"unknown trace kind"),
    ("answer-blank", ("{} is", "Rome", {"answer": " "}), ValueError, r"empty or whitespace"),
    ("answer-id", ("{} is", "Rome", {"answer": 10**6}), ValueError, r"token id"),
    ("too-long", ("{} is" + " very" * 200, "Rome", {}), IncompatibleInputError,
     r"tokens long.*at most 128"),
]


@pytest.mark.parametrize("case", TRACE_CASES, ids=[c[0] for c in TRACE_CASES])
def test_tracer_bad_input(case, gpt2_tokenizer):
    _, (prompt, subject, kw), exc, match = case
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        trace(model, gpt2_tokenizer, prompt, subject, **{"samples": 2, "window": 1, **kw})
    assert_unchanged(model, before)


@pytest.mark.parametrize("problem", ["vocab", "nan", "unknown-family"])
def test_tracer_model_problems(problem, gpt2_tokenizer):
    from lightning_rome.models.layout import UnknownModelFamilyError

    model = tiny_gpt2(vocab_size=1000) if problem == "vocab" else tiny_gpt2()
    if problem == "nan":
        model.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: o * float("nan"))
    if problem == "unknown-family":
        model.config.model_type = "mystery"
    before = snapshot(model)
    exc, match = {"vocab": (IncompatibleInputError, r"only 1000 rows"),
                  "nan": (FloatingPointError, r"NaN or inf"),
                  "unknown-family": (UnknownModelFamilyError, r"mystery")}[problem]
    with pytest.raises(exc, match=match):
        trace(model, gpt2_tokenizer, "Toko Yasuda plays", "Toko Yasuda", samples=2, window=1)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tracer_half_precision(dtype, gpt2_tokenizer):
    model = tiny_gpt2().to(dtype)
    before = snapshot(model)
    t = trace(model, gpt2_tokenizer, "{} plays the", "Toko Yasuda", "mlp", samples=2, window=1)
    assert torch.isfinite(t.scores).all() and 0 <= t.high_score <= 1
    assert_unchanged(model, before)


def test_causal_tracer_bad_arguments(gpt2_tokenizer):
    from lightning_rome.modules import CausalTracer

    with pytest.raises(ValueError, match="answer must be"):
        CausalTracer(tiny_gpt2(), gpt2_tokenizer, answer="best")
    with pytest.raises(ValueError, match="kinds is empty"):
        CausalTracer(tiny_gpt2(), gpt2_tokenizer, kinds=[])
    with pytest.raises(ValueError, match="unknown trace kind"):
        CausalTracer(tiny_gpt2(), gpt2_tokenizer, kinds=["neuron"])


# ----------------------------------------------------------------------------- DataModules
GOOD_CF = rome_case(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                    "P103")
GOOD_ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?",
             "rephrase": "What does UniFirst make?", "alt": "shoes", "answers": ["uniforms"],
             "loc": "nq question: who", "loc_ans": "me", "cond": "c"}
GOOD_KNOWN = {"known_id": 0, "subject": "S", "attribute": "A", "template": "{} is",
              "prediction": " A", "prompt": "S is", "relation_id": "P1"}


def _cf(**rewrite):
    r = json.loads(json.dumps(GOOD_CF))
    r["requested_rewrite"].update(rewrite)
    return [r]


DATA_CASES = [
    # (id, DataModule, file text, exception, message)
    ("cf-truncated", CounterFactDataModule, json.dumps([GOOD_CF])[:-20], CorruptFileError,
     r"could not read .* as a JSON list"),
    ("cf-not-json", CounterFactDataModule, "hello", CorruptFileError, r"JSON list"),
    ("cf-scalar", CounterFactDataModule, "42", CorruptFileError, r"JSON list"),
    ("cf-empty", CounterFactDataModule, "[]", CorruptFileError, r"JSON list"),
    ("cf-no-braces", CounterFactDataModule, json.dumps(_cf(prompt="The tongue is")),
     MalformedRecordError, r"case 0: .*exactly once"),
    ("cf-two-braces", CounterFactDataModule, json.dumps(_cf(prompt="{} and {}")),
     MalformedRecordError, r"case 0: .*exactly once"),
    ("cf-subject-int", CounterFactDataModule, json.dumps(_cf(subject=5)),
     MalformedRecordError, r"case 0: field 'subject' must be a str"),
    ("cf-target-blank", CounterFactDataModule, json.dumps(_cf(target_new={"str": "  "})),
     MalformedRecordError, r"case 0: .*target_new is empty"),
    ("zsre-subject-absent", ZsREDataModule, json.dumps([dict(GOOD_ZSRE, subject="Nope")]),
     MalformedRecordError, r"subject 'Nope' is not in src"),
    ("zsre-target-empty", ZsREDataModule, json.dumps([dict(GOOD_ZSRE, alt="")]),
     MalformedRecordError, r"'alt' is empty"),
    ("zsre-answers-int", ZsREDataModule, json.dumps([dict(GOOD_ZSRE, answers=5)]),
     MalformedRecordError, r"'answers' must be a non-empty list"),
    ("zsre-truncated", ZsREDataModule, json.dumps([GOOD_ZSRE])[:-5], CorruptFileError,
     r"JSON list"),
    ("known-subject-absent", KnownFactsDataModule, json.dumps([dict(GOOD_KNOWN, subject="Q")]),
     MalformedRecordError, r"'Q' is not in the prompt"),
    ("known-attribute-blank", KnownFactsDataModule,
     json.dumps([dict(GOOD_KNOWN, attribute=" ")]), MalformedRecordError, r"'attribute' is"),
    ("known-id-list", KnownFactsDataModule, json.dumps([dict(GOOD_KNOWN, known_id=[1])]),
     MalformedRecordError, r"known_id must be"),
    ("cf-unicode-long-ok", CounterFactDataModule,
     json.dumps(_cf(subject="Tōkō 東京 " * 50 + "Z", target_new={"str": "Klavier 🎹"})),
     None, None),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_datamodule_bad_records(case, tmp_path):
    _, cls, text, exc, match = case
    path = tmp_path / "records.json"
    path.write_text(text, encoding="utf-8")
    stage = "predict" if cls is KnownFactsDataModule else "test"
    dm = cls(path, strict=True, url=None, cache_dir=tmp_path / "hf")
    if exc is None:
        dm.prepare_data()
        dm.setup(stage)
        ds = dm.predict_dataset if stage == "predict" else dm.test_dataset
        assert len(ds) == 1 and ds.records[0].request.target_new == "Klavier 🎹"
        return
    with pytest.raises(exc, match=match):
        dm.prepare_data()
        dm.setup(stage)


def test_datamodule_lenient_mode_skips_and_reports(tmp_path):
    path = tmp_path / "records.json"
    good = rome_case(1, "Toko Yasuda", "{} plays the", "piano", "guitar", "P1")
    path.write_text(json.dumps([*_cf(prompt="no brace"), good]))
    dm = CounterFactDataModule(path, url=None, cache_dir=tmp_path / "hf")
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        dm.prepare_data()
        dm.setup("test")
    assert [c.case_id for c in dm.test_dataset.records] == [1]
    assert dm.test_dataset.malformed[0][0] == 0


# ----------------------------------------------------------------------------- metrics
NAN = float("nan")
METRIC_CASES = [
    ("nan", lambda: efficacy_score(torch.tensor([NAN, 1.0]), torch.tensor([1.0, 2.0])),
     r"contains NaN"),
    ("mismatched-lengths", lambda: efficacy_score(torch.ones(3), torch.ones(2)),
     r"same prompts: 3 vs 2"),
    ("wrong-shapes", lambda: efficacy_score(torch.ones(2, 3), torch.ones(3, 2)), r"same prompts"),
    ("empty", lambda: efficacy_score(torch.ones(0), torch.ones(0)), r"no cases"),
    ("negative-nll", lambda: efficacy_score(torch.tensor([-1.0]), torch.tensor([1.0])),
     r"negative|>= 0"),
    ("prob-above-one", lambda: efficacy_score(torch.tensor([1.5]), torch.tensor([0.5]), "prob"),
     r"> 1|probabilit"),
    ("zsre-lengths", lambda: zsre_accuracy(torch.ones(2, 3, dtype=torch.long),
                                           torch.ones(3, 3, dtype=torch.long)), r"same cases"),
    ("zsre-float-ids", lambda: zsre_accuracy(torch.ones(2, 3), torch.ones(2, 3)),
     r"integer token ids"),
    ("edit-score-lengths", lambda: edit_score(*[torch.ones(2)] * 5, torch.ones(3)),
     r"neighborhood_new and neighborhood_true"),
]


@pytest.mark.parametrize("case", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_metrics_bad_input(case):
    _, fn, match = case
    with pytest.raises(ValueError, match=match):
        fn()


def test_metric_class_rejects_nan_without_corrupting_state():
    from lightning_rome.metrics import EfficacyScore

    m = EfficacyScore()
    m.update(torch.tensor([0.5, 3.0]), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.tensor([NAN]), torch.tensor([1.0]))
    assert float(m.compute()) == pytest.approx(0.5)  # the bad batch left no trace


# ----------------------------------------------------------------------------- CLI
CLI_CASES = [
    ("no-braces", ["--prompt", "plays the", "--subject", "A", "--target", "x"], r"exactly once"),
    ("two-braces", ["--prompt", "{} and {}", "--subject", "A", "--target", "x"], r"exactly once"),
    ("empty-subject", ["--prompt", "{} plays", "--subject", "", "--target", "x"], r"subject"),
    ("blank-target", ["--prompt", "{} plays", "--subject", "A", "--target", "  "], r"target"),
    ("layer", ["--prompt", "{} plays", "--subject", "A", "--target", "x", "--layer", "9"],
     r"out of range"),
    ("too-long", ["--prompt", "{} plays" + " very" * 200, "--subject", "A", "--target", "x",
                  "--layer", "1"], r"tokens long"),
    ("missing-hparams", ["--prompt", "{} plays", "--subject", "A", "--target", "x",
                         "--hparams", "/nonexistent/h.yaml"], r"h\.yaml|No such file|not found"),
]


@pytest.mark.parametrize("name,argv,match", CLI_CASES,
                         ids=[getattr(c, "values", c)[0] for c in CLI_CASES])
def test_cli_edit_bad_input_is_one_line(name, argv, match, model_dir, capsys):
    from lightning_rome.cli import main

    rc = main(["edit", "--model", str(model_dir), *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    import re

    assert re.search(match, lines[0]), lines[0]


def test_cli_missing_model_and_bad_patch(tmp_path, model_dir, capsys):
    from lightning_rome.cli import main

    assert main(["edit", "--model", str(tmp_path / "nope"), "--prompt", "{} x", "--subject",
                 "A", "--target", "b"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    assert main(["apply-patch", "--model", str(model_dir), "--patch", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.safetensors" in err
    assert len(err.strip().splitlines()) == 1
