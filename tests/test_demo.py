"""``lightning-rome demo`` end to end, on the cached COUNTERFACT model.

The default test runs the whole demo with a small MEMIT batch; the full-size run (100 MEMIT edits,
as ``make demo`` does) is marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_rome.demo import outcome, run_demo, typical_index
from lightning_rome.patches import WeightPatch
from lightning_rome.testing import get_counterfact_model
from lightning_rome.tokens import continuation_ids, encode_prompt


def _logprob(model, tok, prompt: str, target: str) -> float:
    """Mean log-probability of ``target``'s tokens after ``prompt``: one plain forward pass."""
    p = encode_prompt(tok, prompt)
    t = continuation_ids(tok, target)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + t])).logits[0].log_softmax(-1)  # (T, V)
    return float(sum(logp[len(p) - 1 + j, x] for j, x in enumerate(t)) / len(t))


def _row(summary, method):
    (label,) = [k for k in summary["rows"] if k.startswith(method)]
    return {k: v["mean"] for k, v in summary["rows"][label].items()}


def _check_outputs(out, summary, n_memit):
    for name in ("trace-hidden.png", "trace-mlp.png", "trace-attn.png", "summary.md",
                 "trace-average-hidden.png", "trace-average-mlp.png", "trace-average-attn.png",
                 "trace-average-lines.png", "trace-average-mlp-classes.png"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["memit_case_ids"] == summary["memit_case_ids"]
    assert len(summary["memit_case_ids"]) == n_memit
    # The headline case is a typical one of the ROME edits: its outcome is the majority's.
    outcomes = [tuple(o) for o in summary["rome_outcomes"]]
    assert len(outcomes) == len(summary["rome_case_ids"])
    assert summary["edited_case"] == summary["rome_case_ids"][typical_index(outcomes)]
    n = len(outcomes)
    majority = tuple(2 * sum(o[k] for o in outcomes) >= n for k in range(3))
    assert majority in outcomes
    assert outcomes[summary["rome_case_ids"].index(summary["edited_case"])] == majority
    # The per-case outcomes are the table's ES / PS / NS (one prompt of each kind per case).
    rome = _row(summary, "ROME")
    for k, name in enumerate(("ES", "PS", "NS")):
        assert rome[name] == pytest.approx(sum(o[k] for o in outcomes) / n), name
    rome_patch = WeightPatch.load(out / "rome-patch.safetensors")
    memit_patch = WeightPatch.load(out / "memit-patch.safetensors")
    assert len(rome_patch.deltas) == 1 and len(memit_patch.deltas) >= 1
    table = (out / "summary.md").read_text()
    assert "unedited" in table and "ROME" in table and "MEMIT" in table


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, n_memit=5, n_rome=6, n_trace=10)
    _check_outputs(out, summary, 5)
    printed = capsys.readouterr().out
    assert str(out / "summary.json") in printed and "MEMIT (5 edits at once)" in printed
    assert "ROME (6 cases, one at a time)" in printed
    assert summary["trace"]["n"] == 10 and summary["trace"]["ate"] > 0
    # The model knows the true facts of its cases, so unedited it scores no efficacy; both
    # editors move some edit prompts to the new targets.
    unedited, rome, memit = (_row(summary, m) for m in ("unedited", "ROME", "MEMIT"))
    assert unedited["ES"] == 0.0 and unedited["NS"] == 1.0
    # GE, from the texts sampled after each case's edit prompt and paraphrase, in every row:
    # the unedited model's text is fluent text (bi-/trigram entropy well above a repeated token's).
    for row in (unedited, rome, memit):
        assert 1.0 < row["GE"] < 20.0, row
    assert rome["ES"] > 0 and memit["ES"] > 0
    # The saved ROME patch, applied to a fresh copy of the model, raises the new target against
    # the true one on the edit prompt (an independent forward pass), and reverts bit-exactly.
    cm = get_counterfact_model()
    (case,) = [x for x in cm.cases if x.case_id == summary["edited_case"]]
    r = case.request
    before = _logprob(cm.model, cm.tokenizer, r.text, r.target_new) - _logprob(
        cm.model, cm.tokenizer, r.text, r.target_true)
    patch = WeightPatch.load(out / "rome-patch.safetensors")
    original = {k: v.clone() for k, v in cm.model.state_dict().items()}
    patch.apply(cm.model)
    after = _logprob(cm.model, cm.tokenizer, r.text, r.target_new) - _logprob(
        cm.model, cm.tokenizer, r.text, r.target_true)
    patch.revert(cm.model)
    assert before < 0 and after > before + 1.0
    ok = summary["rome_outcomes"][summary["rome_case_ids"].index(case.case_id)][0]
    assert ok == (after > 0)  # the headline's efficacy outcome is this comparison
    for k, v in cm.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    # The README's demo blocks render from the summary.json the demo writes, as
    # `python -m benchmarks.readme_numbers --run demo` reads it.
    from benchmarks import readme_numbers as rn

    written = json.loads((out / "summary.json").read_text())
    assert written["example"] == {"prompt": r.text, "true": r.target_true, "new": r.target_new}
    rec = {"provenance": rn.provenance("test"), "data": {"wall_seconds": 1.0,
                                                          "summary": written}}
    texts = {name: rn.BLOCKS[name].render(rec) for name in rn.BLOCKS
             if rn.BLOCKS[name].job == "demo"}
    assert f"total effect is {summary['trace']['ate']:.2f}" in texts["demo-trace"]
    assert "MEMIT (5 edits at once)" in texts["demo-table"] and r.text in texts["demo-table"]
    assert f"{summary['n_known_cases']} cases are known" in texts["demo-model"]


def test_outcome_and_typical_index():
    def score(rw, pa, nb):  # (nll_new, nll_true) per kind
        return {"rewrite": {"nll_new": [rw[0]], "nll_true": [rw[1]]},
                "paraphrase": {"nll_new": [pa[0]], "nll_true": [pa[1]]},
                "neighborhood": {"nll_new": [nb[0]], "nll_true": [nb[1]]}}

    assert outcome(score((1, 2), (2, 1), (3, 1))) == (True, False, True)
    assert outcome(score((2, 1), (1, 2), (1, 3))) == (False, True, False)
    assert outcome(score((1, 1), (1, 1), (1, 1))) == (False, False, False)  # ties: no success
    rows = [(True, False, True), (False, False, True), (True, True, True), (True, False, True)]
    assert typical_index(rows) == 0  # majority (True, False, True)
    assert typical_index([(False, True, False), (True, True, True)]) == 1  # ties count as True
    assert typical_index([(True, True, True), (False, False, False)]) == 0
    assert typical_index([(True, False, False), (False, True, False), (False, False, True)]) == 0
    with pytest.raises(ValueError, match="at least one"):
        typical_index([])


@pytest.mark.slow
def test_demo_full(tmp_path):
    """``make demo``'s run: 100 MEMIT edits, on the cached model."""
    out = tmp_path / "demo"
    summary = run_demo(out)
    _check_outputs(out, summary, 100)
    assert len(summary["rome_case_ids"]) == 50 and summary["trace"]["n"] == 100
    # Measured on the default model (README): ROME ES about 0.5, MEMIT about 0.3, both far above
    # the unedited 0 on 100 known facts.
    assert _row(summary, "ROME")["ES"] >= 0.3 and _row(summary, "MEMIT")["ES"] >= 0.15


def test_demo_seed_sets_the_trace_noise(tmp_path):
    """``--seed``: the same seed repeats the demo's traces, another seed draws other noise."""
    kw = {"n_memit": 1, "n_rome": 1, "n_trace": 3}
    a = run_demo(tmp_path / "a", seed=1, **kw)
    b = run_demo(tmp_path / "b", seed=1, **kw)
    c = run_demo(tmp_path / "c", seed=2, **kw)
    assert a["trace"] == b["trace"]
    assert a["trace"]["ate"] != c["trace"]["ate"]


def test_demo_command_takes_a_seed(monkeypatch):
    from lightning_rome import cli

    seen = {}
    monkeypatch.setattr("lightning_rome.demo.run_demo", lambda **kw: seen.update(kw))
    assert cli.main(["demo", "--seed", "7", "--memit", "3"]) == 0
    assert seen["seed"] == 7 and seen["n_memit"] == 3
