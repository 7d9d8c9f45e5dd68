"""Mass editing: 1,000 COUNTERFACT rewrites at once with MEMIT, timed.

Reads the cases with :class:`~lightning_rome.data.CounterFactDataModule` from the local
``counterfact/counterfact-train.json`` (``$LIGHTNING_ROME_DATA``), takes the layer statistics
from WikiText, writes every rewrite with MEMIT (in chunks of ``--chunk`` requests: one patch per
chunk), then measures efficacy and specificity on the edited cases with the COUNTERFACT metrics
and reverts the model exactly.

    python examples/mass_edit.py                 # offline: 1,000 edits on the demo model
    python examples/mass_edit.py --model gpt2-xl --preset gpt2-xl --n 10000   # online, a GPU

By default the model is the demo's small GPT-2 trained on the first 300 cases of
``counterfact-val.json`` (``lightning_rome.testing.get_counterfact_model``; trained once and
cached), edited with the ``demo-model`` MEMIT preset. It knows those 300 facts only, so for the
other cases "unedited" efficacy is whatever the model guesses; efficacy after the edit
(P[new] > P[true]) is meaningful for all of them.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lightning_rome.data import CounterFactDataModule
from lightning_rome.editing import MEMIT
from lightning_rome.metrics import compute_with_ci, counterfact_metrics, summary_table
from lightning_rome.models import load_model
from lightning_rome.models.loading import resolve_dtype
from lightning_rome.modules.evaluator import score_cases
from lightning_rome.stats import get_second_moments
from lightning_rome.testing import get_counterfact_model


def _score(model: Any, tok: Any, cases: list[Any]) -> dict[str, Any]:
    """COUNTERFACT probability metrics (ES, PS, NS, S and magnitudes) over ``cases``."""
    metrics = counterfact_metrics(generation=False)
    scores = score_cases(model, tok, cases)
    metrics.update(**{f"{kind}_{which}": [s[kind][f"nll_{which}"] for s in scores]
                      for kind in ("rewrite", "paraphrase", "neighborhood")
                      for which in ("new", "true")})
    return compute_with_ci(metrics)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="how many COUNTERFACT cases to edit")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="requests per MEMIT batch (one patch per chunk)")
    parser.add_argument("--file", default="counterfact/counterfact-val.json",
                        help="the COUNTERFACT file (relative to $LIGHTNING_ROME_DATA)")
    parser.add_argument("--model", default=None,
                        help="a hub name or local folder (default: the demo's COUNTERFACT model)")
    parser.add_argument("--preset", default="demo-model", help="a MEMIT preset or YAML file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if args.model is None:
        cm = get_counterfact_model()
        model, tok = cm.model.to(args.device), cm.tokenizer
    else:
        model, tok = load_model(args.model, device=args.device)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    dm = CounterFactDataModule(path=args.file, test_split="all", limit=args.n)
    dm.setup("test")
    cases = dm.datasets["test"].records
    requests = [c.request for c in cases]
    print(f"{len(requests)} COUNTERFACT cases from {dm.datasets['test'].source}")

    t0 = time.perf_counter()
    memit = MEMIT(args.preset)
    hp = memit.hparams  # every layer's statistics in one pass, cached on disk for later runs
    get_second_moments(model, tok, hp.layers, corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples,
                       dtype=resolve_dtype(hp.mom2_dtype), progress=False)
    t_stats = time.perf_counter() - t0

    before = _score(model, tok, cases)
    t1 = time.perf_counter()
    patches = list(memit.edit_stream(model, tok, requests, chunk_size=args.chunk))
    t_edit = time.perf_counter() - t1
    after = _score(model, tok, cases)
    for patch in reversed(patches):
        patch.revert(model)
    restored = all(torch.equal(p, original[n]) for n, p in model.named_parameters())

    print(summary_table({"unedited": before, f"MEMIT ({len(requests)} edits)": after}))
    print(f"statistics: {t_stats:.1f} s (cached after the first run)\n"
          f"editing:    {t_edit:.1f} s for {len(requests)} edits in {len(patches)} batch(es): "
          f"{len(requests) / t_edit:.1f} edits/s")
    return {"n": len(requests), "before": before, "after": after, "seconds_edit": t_edit,
            "seconds_stats": t_stats, "edits_per_second": len(requests) / t_edit,
            "patches": len(patches), "restored": restored}


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
