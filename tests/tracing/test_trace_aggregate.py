"""Averaging traces: token classes, AIE/ATE with confidence intervals against numpy, the
suggested edit layer, and aggregate files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_causal_trace_io import make_trace

from lightning_rome.tracing import (
    TOKEN_CLASSES,
    TraceAggregate,
    average_traces,
    class_effects,
    suggest_edit_layer,
    token_classes,
)
from lightning_rome.utils.io import CorruptFileError


def test_token_classes():
    # "The Space Need le is in" : subject tokens 1..3, then 4, 5 (last).
    assert token_classes(6, (1, 4)) == [[1], [2], [3], [4], [], [5]]
    # Longer tail: first subsequent 4, further 5..7, last 8.
    assert token_classes(9, (1, 4)) == [[1], [2], [3], [4], [5, 6, 7], [8]]
    # One-token subject at the start: first = last subject token, no middle.
    assert token_classes(5, (0, 1)) == [[0], [], [0], [1], [2, 3], [4]]
    # Subject right before the last token: no subsequent token other than the last.
    assert token_classes(4, (1, 3)) == [[1], [], [2], [], [], [3]]
    # Subject at the very end.
    assert token_classes(3, (1, 3)) == [[1], [], [2], [], [], [2]]
    with pytest.raises(ValueError, match="span"):
        token_classes(3, (2, 5))


def _random_trace(rng, n_tokens, span, n_layers=5, kind="mlp"):
    scores = torch.tensor(rng.uniform(0, 1, (n_tokens, n_layers)), dtype=torch.float32)
    low, high = float(rng.uniform(0, 0.2)), float(rng.uniform(0.5, 1))
    ids = list(range(n_tokens))
    return make_trace(scores=scores, high_score=high, low_score=low,
                      tokens=[f"t{i}" for i in ids], input_ids=ids, subject_range=span,
                      kind=kind, sever=None, window=3)


def test_average_matches_numpy():
    rng = np.random.default_rng(0)
    spans = [(8, (1, 4)), (6, (0, 1)), (10, (2, 7)), (5, (1, 3)), (7, (0, 2))]
    traces = [_random_trace(rng, n, s) for n, s in spans]
    agg = average_traces(traces)
    assert agg.n_prompts == 5 and agg.kind == "mlp" and agg.window == 3
    # Independent computation: per prompt, per class, the mean IE of that class's rows.
    per_class: dict[int, list[np.ndarray]] = {k: [] for k in range(6)}
    for t, (n, (b, e)) in zip(traces, spans):
        ie = t.scores.double().numpy() - t.low_score
        rows = {0: [b], 1: list(range(b + 1, e - 1)), 2: [e - 1],
                3: [e] if e < n - 1 else [], 4: list(range(e + 1, n - 1)), 5: [n - 1]}
        for k, r in rows.items():
            if r:
                per_class[k].append(ie[r].mean(0))
    for k in range(6):
        x = np.stack(per_class[k])  # (n_k, L)
        assert int(agg.counts[k]) == len(x)
        np.testing.assert_allclose(agg.aie[k].numpy(), x.mean(0), rtol=1e-12)
        if len(x) > 1:
            half = 1.959963984540054 * x.std(0, ddof=1) / math.sqrt(len(x))
            np.testing.assert_allclose(agg.aie_high[k].numpy(), x.mean(0) + half, rtol=1e-10)
            np.testing.assert_allclose(agg.aie_low[k].numpy(), x.mean(0) - half, rtol=1e-10)
        else:
            assert bool(torch.isnan(agg.aie_low[k]).all())
    te = np.array([t.high_score - t.low_score for t in traces])
    assert agg.ate == pytest.approx(te.mean())
    assert agg.ate_high - agg.ate == pytest.approx(1.959963984540054 * te.std(ddof=1) / 5 ** 0.5)
    assert agg.high_score == pytest.approx(np.mean([t.high_score for t in traces]))
    # class_effects of one trace: NaN where the prompt lacks the class.
    ce = class_effects(traces[3])  # 5 tokens, subject (1, 3): no middle and no further tokens
    assert torch.isnan(ce[[1, 4]]).all() and not torch.isnan(ce[[0, 2, 3, 5]]).any()


def test_best_layer_and_suggestion():
    rng = np.random.default_rng(1)
    traces = []
    for n, span in [(6, (1, 3)), (7, (0, 2)), (5, (1, 2))]:
        t = _random_trace(rng, n, span, n_layers=6)
        t.scores[span[1] - 1] = 0.2
        t.scores[span[1] - 1, 4] = 0.95  # the last subject token peaks at layer 4
        traces.append(t)
    agg = average_traces(traces)
    assert agg.best_layer() == 4 and suggest_edit_layer(agg) == 4
    assert suggest_edit_layer(traces) == 4 and suggest_edit_layer(traces[0]) == 4
    hidden = [_random_trace(rng, 6, (1, 3), n_layers=6, kind="hidden") for _ in range(2)]
    with pytest.raises(ValueError, match="MLP"):
        suggest_edit_layer(hidden)
    with pytest.raises(ValueError, match="MLP"):
        suggest_edit_layer(hidden[0])
    with pytest.raises(ValueError, match="unknown token class"):
        agg.best_layer("subject")


def test_mixed_traces_are_refused():
    rng = np.random.default_rng(2)
    a = _random_trace(rng, 6, (1, 3))
    with pytest.raises(ValueError, match="cannot average"):
        average_traces([a, _random_trace(rng, 6, (1, 3), kind="attn")])
    with pytest.raises(ValueError, match="cannot average"):
        average_traces([a, _random_trace(rng, 6, (1, 3), n_layers=4)])
    with pytest.raises(ValueError, match="at least one"):
        average_traces([])


def test_aggregate_file_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    agg = average_traces([_random_trace(rng, 6, (1, 3)) for _ in range(3)])
    assert agg.counts[1] == 0 and bool(torch.isnan(agg.aie[1]).all())  # no middle tokens
    back = TraceAggregate.load(agg.save(tmp_path / "agg.json"))
    for name in ("aie", "aie_low", "aie_high"):
        torch.testing.assert_close(getattr(back, name), getattr(agg, name), equal_nan=True,
                                   rtol=0, atol=0)
    assert back.classes == TOKEN_CLASSES and back.ate == agg.ate and torch.equal(back.counts,
                                                                                 agg.counts)
    (tmp_path / "bad.json").write_text('{"format": "lightning_rome.trace_aggregate", '
                                       '"version": 1, "kind": "mlp"}')
    with pytest.raises(CorruptFileError, match=r"bad\.json"):
        TraceAggregate.load(tmp_path / "bad.json")
