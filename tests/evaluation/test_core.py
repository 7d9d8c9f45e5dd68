"""The evaluation core's own pieces: the options, the metrics' declared inputs, and the docstring
examples of the Trainer-free modules."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect

import pytest
import torch
from torchmetrics import Metric

import lightning_rome.metrics as M
from lightning_rome.evaluation import (
    INPUTS,
    EvalOptions,
    case_inputs,
    evaluate_cases,
    update_metrics,
)


# ---------------------------------------------------------------------------------- options
def test_options_are_checked_frozen_and_complete():
    opts = EvalOptions(generation=True, generation_kwargs={"max_new_tokens": 7}, seed=3)
    assert opts.generation_settings() == {"max_new_tokens": 7, "top_k": 5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        opts.generation_kwargs["top_k"] = 1  # type: ignore[index]  # a read-only copy
    for bad, match in ((dict(mode="parallel"), "mode"), (dict(on_error="ignore"), "on_error"),
                       (dict(score_batch_size=0), "score_batch_size"),
                       (dict(baseline="yes"), "baseline"), (dict(seed=1.5), "seed")):
        with pytest.raises(ValueError, match=match):
            EvalOptions(**bad)
    with pytest.raises(TypeError, match="generation_kwargs"):
        EvalOptions(generation_kwargs=[("top_k", 1)])  # type: ignore[arg-type]
    assert EvalOptions.from_settings(opts, seed=9) == dataclasses.replace(opts, seed=9)
    with pytest.raises(TypeError, match=r"unknown evaluation option.*seeds.*the options are"):
        EvalOptions.from_settings(None, seeds=1)


def test_evaluate_cases_refuses_a_sequential_options_object(gpt2_tokenizer):
    with pytest.raises(ValueError, match="evaluate_sequential"):
        evaluate_cases(torch.nn.Linear(1, 1), gpt2_tokenizer, [], None,
                       options=EvalOptions(mode="sequential"))
    with pytest.raises(TypeError, match="unknown evaluation option"):
        evaluate_cases(torch.nn.Linear(1, 1), gpt2_tokenizer, [], None, batch_size=3)


# ---------------------------------------------------------------------------------- inputs
METRIC_CLASSES = [getattr(M, n) for n in M.__all__
                  if isinstance(getattr(M, n), type) and issubclass(getattr(M, n), Metric)]


@pytest.mark.parametrize("cls", METRIC_CLASSES, ids=lambda c: c.__name__)
def test_declared_inputs_are_inputs_of_update_and_of_records(cls):
    needs = cls.evaluation_inputs
    if needs is None:  # not fed from records (CaseMean's values, ZsREAccuracy's generic form)
        assert cls in (M.CaseMean, M.MetricWithCI, M.ZsREAccuracy)
        return
    params = inspect.signature(cls.update).parameters
    assert needs and all(n in params for n in needs), (needs, list(params))
    assert all(n in INPUTS for n in needs)


RECORD = {"status": "ok", "relation_id": "P1", "target_new_id": "Q1", "post": {
    "rewrite": {"nll_new": [0.5], "nll_true": [2.0], "correct_new": [[True, False]],
                "correct_true": [[False]]},
    "neighborhood": {"nll_new": [3.0], "nll_true": [1.0], "correct_new": [[False]],
                     "correct_true": [[True, True]]}}}


def test_each_metric_gets_exactly_the_inputs_it_declares():
    seen = []

    class Spy(Metric):
        evaluation_inputs = ("rewrite_new", "neighborhood_correct")

        def update(self, **kw):
            seen.append(kw)

        def compute(self):
            return torch.tensor(0.0)

    class NeedsParaphrase(Spy):
        evaluation_inputs = ("paraphrase_new",)

    update_metrics({"post": {"a": Spy(), "b": NeedsParaphrase()}}, RECORD)
    # Only what it names, as one-case batches; the metric whose prompts are missing is skipped.
    assert seen == [{"rewrite_new": [[0.5]], "neighborhood_correct": [[True, True]]}]
    assert case_inputs({**RECORD, "status": "error"}, "post") == {}
    assert case_inputs(RECORD, "pre") == {}

    class Undeclared(Metric):
        def update(self, rewrite_new):
            pass

        def compute(self):
            return torch.tensor(0.0)

    with pytest.raises(TypeError, match="does not say which case inputs it needs"):
        update_metrics({"post": {"u": Undeclared()}}, RECORD)
    Spy.evaluation_inputs = ("rewrite_logits",)
    with pytest.raises(TypeError, match=r"needs \['rewrite_logits'\], which no case record"):
        update_metrics({"post": {"a": Spy()}}, RECORD)


def test_es_and_ns_from_a_record_match_their_definitions():
    metrics = {"post": {"ES": M.EfficacyScore(), "NS": M.NeighborhoodScore(),
                        "eff": M.ZsREEfficacy(), "spec": M.ZsRESpecificity()}}
    update_metrics(metrics, RECORD)
    m = metrics["post"]
    assert float(m["ES"].compute()) == 1.0  # NLL(o*) 0.5 < NLL(o^c) 2.0
    assert float(m["NS"].compute()) == 1.0  # the neighbour's own answer 1.0 < 3.0
    assert float(m["eff"].compute()) == 0.5  # one of two o* tokens right
    assert float(m["spec"].compute()) == 1.0


# ---------------------------------------------------------------------------------- doctests
@pytest.mark.parametrize("name", ["lightning_rome.evaluation.options",
                                  "lightning_rome.evaluation.results"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0, name
