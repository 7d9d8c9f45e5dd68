"""``lightning-rome demo`` end to end, on the cached COUNTERFACT model.

The default test runs the whole demo with a small MEMIT batch; the full-size run (100 MEMIT edits,
as ``make demo`` does) is marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_rome.demo import run_demo
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
    for name in ("trace-hidden.png", "trace-mlp.png", "trace-attn.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["memit_case_ids"] == summary["memit_case_ids"]
    assert len(summary["memit_case_ids"]) == n_memit
    assert set(summary["memit_case_ids"]).isdisjoint({summary["edited_case"]})
    rome = WeightPatch.load(out / "rome-patch.safetensors")
    memit = WeightPatch.load(out / "memit-patch.safetensors")
    assert len(rome.deltas) == 1 and len(memit.deltas) >= 1
    table = (out / "summary.md").read_text()
    assert "unedited" in table and "ROME" in table and "MEMIT" in table


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, n_memit=5)
    _check_outputs(out, summary, 5)
    printed = capsys.readouterr().out
    assert str(out / "summary.json") in printed and "MEMIT (5 edits at once)" in printed
    # The model knows the true facts of its cases, so unedited it scores no efficacy; both
    # editors move the edit prompts to the new targets.
    unedited, rome, memit = (_row(summary, m) for m in ("unedited", "ROME", "MEMIT"))
    assert unedited["ES"] == 0.0 and unedited["NS"] == 1.0
    assert rome["ES"] >= 0.8 and memit["ES"] >= 0.8
    c = summary["completions"]
    assert c["before"][0] != c["after"][0]  # the edit prompt's completion changed
    # The saved ROME patch, applied to a fresh copy of the model, makes the new target more
    # likely than the true one on the edit prompt (an independent forward pass), and reverts.
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
    assert before < 0 < after
    for k, v in cm.model.state_dict().items():
        assert torch.equal(v, original[k]), k


@pytest.mark.slow
def test_demo_full(tmp_path):
    """``make demo``'s run: 100 MEMIT edits, on the cached model."""
    out = tmp_path / "demo"
    summary = run_demo(out)
    _check_outputs(out, summary, 100)
    assert summary["seconds"] < 120 or not summary["from_cache"]
    memit = _row(summary, "MEMIT")
    assert memit["ES"] >= 0.8
