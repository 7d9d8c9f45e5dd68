"""Every metric synchronised over two processes (ddp_spawn, gloo) equals the one-process result."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rome.metrics import (
    TfidfTable,
    compute_with_ci,
    counterfact_metrics,
    zsre_metrics,
)

REFS = [
    "Paris is the capital of France.",
    "Rome is the capital of Italy.",
    "The guitar is a string instrument.",
    "English is a West Germanic language.",
]
WORDS = ["capital", "city", "France", "guitar", "the", "is", "language", "Paris", "a", "."]
# Uneven shards: (rank, batch) -> number of cases.
SIZES = {(0, 0): 3, (0, 1): 5, (1, 0): 1, (1, 1): 4}


def shard(rank: int, batch_idx: int) -> dict:
    """Deterministic inputs for one batch of one rank, with variable prompt counts per case."""
    rng = np.random.default_rng(100 * rank + batch_idx)
    n = SIZES[(rank, batch_idx)]
    out: dict = {}
    for kind, max_p in [("rewrite", 1), ("paraphrase", 2), ("neighborhood", 4)]:
        counts = rng.integers(1, max_p + 1, n)
        out[f"{kind}_new"] = [torch.tensor(rng.uniform(0, 4, c)) for c in counts]
        out[f"{kind}_true"] = [torch.tensor(rng.uniform(0, 4, c)) for c in counts]
        lengths = rng.integers(1, 4, n)
        targets = [torch.tensor(rng.integers(0, 5, k)) for k in lengths]
        out[f"{kind}_preds"] = [
            torch.where(torch.tensor(rng.random(len(t)) < 0.5), t, (t + 1) % 5) for t in targets
        ]
        out[f"{kind}_target"] = targets
    out["generated_texts"] = [[" ".join(rng.choice(WORDS, 9)) for _ in range(2)] for _ in range(n)]
    out["reference_texts"] = [[REFS[int(i)]] for i in rng.integers(0, 4, n)]
    return out


def all_data() -> dict:
    parts = [shard(r, b) for (r, b) in sorted(SIZES)]
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def expected_results() -> dict:
    """One process, straight from the functional per-case values (independent of the states)."""
    from lightning_rome.metrics.functional.counterfact import (
        _efficacy_magnitude_update,
        _efficacy_score_update,
        _neighborhood_magnitude_update,
        _neighborhood_score_update,
        _paraphrase_magnitude_update,
        _paraphrase_score_update,
    )
    from lightning_rome.metrics.functional.generation_entropy import _generation_entropy_update
    from lightning_rome.metrics.functional.reference_score import _reference_score_update
    from lightning_rome.metrics.functional.zsre import _zsre_accuracy_update

    d = all_data()
    table = TfidfTable.fit(REFS)
    per_case = {
        "ES": _efficacy_score_update(d["rewrite_new"], d["rewrite_true"]),
        "EM": _efficacy_magnitude_update(d["rewrite_new"], d["rewrite_true"]),
        "PS": _paraphrase_score_update(d["paraphrase_new"], d["paraphrase_true"]),
        "PM": _paraphrase_magnitude_update(d["paraphrase_new"], d["paraphrase_true"]),
        "NS": _neighborhood_score_update(d["neighborhood_new"], d["neighborhood_true"]),
        "NM": _neighborhood_magnitude_update(d["neighborhood_new"], d["neighborhood_true"]),
        "GE": _generation_entropy_update(d["generated_texts"]),
        "RS": _reference_score_update(d["generated_texts"], d["reference_texts"], table),
        "efficacy": _zsre_accuracy_update(d["rewrite_preds"], d["rewrite_target"]),
        "paraphrase": _zsre_accuracy_update(d["paraphrase_preds"], d["paraphrase_target"]),
        "specificity": _zsre_accuracy_update(d["neighborhood_preds"], d["neighborhood_target"]),
    }
    out = {}
    rates = {"ES", "PS", "NS", "efficacy", "paraphrase", "specificity"}
    bounds = {"EM": (-1, 1), "PM": (-1, 1), "NM": (-1, 1), "RS": (0, 1)}
    for k, v in per_case.items():
        x = v.numpy()
        m, n = float(x.mean()), len(x)
        if k in rates:  # Wilson: the roots in p of (m - p)^2 = z^2 p (1 - p) / n
            q = 1.96**2 / n
            a, b, c = 1 + q, -(2 * m + q), m * m
            root = np.sqrt(b * b - 4 * a * c)
            low, high = (-b - root) / (2 * a), (-b + root) / (2 * a)
        else:  # mean ± 1.96 s.e., clipped to the metric's range
            half = 1.96 * x.std(ddof=1) / np.sqrt(n)
            lo, hi = bounds.get(k, (-np.inf, np.inf))
            low, high = max(m - half, lo), min(m + half, hi)
        out[k] = {"mean": m, "ci_low": float(low), "ci_high": float(high), "n": n}
    # S: the harmonic mean of the case-averaged ES, PS and NS
    s = 3 / sum(1 / out[k]["mean"] for k in ("ES", "PS", "NS"))
    out["S"] = {"mean": s, "n": len(d["rewrite_new"])}
    return out


class MetricsModule(L.LightningModule):
    def __init__(self, out_dir: str, expected: dict) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.cf = counterfact_metrics(tfidf=TfidfTable.fit(REFS))
        self.zsre = zsre_metrics(prefix="zsre/")
        self.out_dir = out_dir
        self.expected = expected

    def test_step(self, batch, batch_idx):
        data = shard(self.global_rank, batch_idx)
        self.cf.update(**data)
        self.zsre.update(**data)
        # Lightning computes (and syncs) logged Metric objects at the epoch end
        self.log_dict(self.zsre, on_step=False, on_epoch=True)

    def on_test_epoch_end(self):
        assert self.trainer.world_size == 2
        results = {**compute_with_ci(self.cf), **compute_with_ci(self.zsre)}
        plain = {k: float(v) for k, v in self.cf.compute().items()}
        for key, want in self.expected.items():
            got = results.get(key, results.get(f"zsre/{key}"))
            assert got["n"] == want["n"] == 13, key
            assert got["mean"] == pytest.approx(want["mean"], abs=1e-9), key
            if key in plain:
                assert plain[key] == pytest.approx(want["mean"], abs=1e-6), key
            if "ci_low" in want:
                assert got["ci_low"] == pytest.approx(want["ci_low"], abs=1e-9), key
                assert got["ci_high"] == pytest.approx(want["ci_high"], abs=1e-9), key
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(results, f)

    def test_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=1)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_all_metrics_sync_over_two_processes(tmp_path):
    expected = expected_results()
    assert expected["ES"]["n"] == 13
    module = MetricsModule(str(tmp_path), expected)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    logged = trainer.test(module, verbose=False)[0]
    for key in ["efficacy", "paraphrase", "specificity"]:
        assert logged[f"zsre/{key}"] == pytest.approx(expected[key]["mean"], abs=1e-6)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["S"]["mean"] == pytest.approx(expected["S"]["mean"], abs=1e-9)
    # the same collections updated in this one process with all the data, batch by batch
    cf, zsre = counterfact_metrics(tfidf=TfidfTable.fit(REFS)), zsre_metrics(prefix="zsre/")
    for rank, batch_idx in sorted(SIZES):
        cf.update(**shard(rank, batch_idx))
        zsre.update(**shard(rank, batch_idx))
    single = {**compute_with_ci(cf), **compute_with_ci(zsre)}
    assert set(single) == set(rank0)
    for key, want in single.items():
        assert rank0[key] == pytest.approx(want, abs=1e-9), key
