"""Recipe search for the demo's COUNTERFACT model (issue 20): where do its facts live?

For each training recipe (a set of :class:`~lightning_rome.testing.CounterFactModelConfig`
overrides) this trains (or loads from the cache) the model, then measures

* the MLP causal trace averaged over ``--n-trace`` known facts (token classes, 95% CI), and the
  share of the total effect that the peak MLP effect at the last subject token reaches;
* ROME at the subject's last token (``subject_last``, as published) on ``--n-rome`` single edits
  at each layer in ``--layers``: ES, PS, NS.

Usage: ``python -m benchmarks.bench_demo_recipes --recipe NAME [--recipe NAME ...]``; the
recipes are in :data:`RECIPES`. One JSON line per recipe is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

#: name -> CounterFactModelConfig overrides
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "e2m2": {"extra_relations": 2, "multi_fact_rows": 2},
    "e2m2-200-reph": {"extra_relations": 2, "multi_fact_rows": 2, "n_cases": 200,
                      "train_rephrase": True},
    "e2m2-sar-w3": {"extra_relations": 2, "multi_fact_rows": 2, "subject_attribute_rows": True,
                    "extra_wordings": 3},
    "e2m2-sar-200": {"extra_relations": 2, "multi_fact_rows": 2, "subject_attribute_rows": True,
                     "n_cases": 200},
    "e2m2-sar-200-p1": {"extra_relations": 2, "multi_fact_rows": 2,
                        "subject_attribute_rows": True, "n_cases": 200, "prefix_copies": 1},
    "e2m2-sar-200-p1-lr5-w300": {"extra_relations": 2, "multi_fact_rows": 2,
                                 "subject_attribute_rows": True, "n_cases": 200,
                                 "prefix_copies": 1, "lr": 0.005, "wikitext_rows": 300},
    "e2m2-sar-260-p1": {"extra_relations": 2, "multi_fact_rows": 2,
                        "subject_attribute_rows": True, "n_cases": 260, "prefix_copies": 1},
}


def measure(overrides: dict[str, Any], n_trace: int, n_rome: int, layers: list[int],
            window: int, rome_hp: dict[str, Any] | None = None) -> dict[str, Any]:
    from lightning_rome.demo import known_trace_cases, rome_row, trace_average
    from lightning_rome.testing import CounterFactModelConfig, get_counterfact_model

    t0 = time.time()
    cm = get_counterfact_model(CounterFactModelConfig(**overrides))
    st = cm.stats
    out: dict[str, Any] = {
        "overrides": overrides, "from_cache": cm.from_cache,
        "build_seconds": st.get("build_seconds"), "train_seconds": st.get("train_seconds"),
        "n_known": len(cm.known_cases),
        "acc_train": st.get("accuracy_train"), "acc_neigh": st.get("accuracy_neighborhood"),
        "acc_para": st.get("accuracy_paraphrase"), "pair_para": st.get("pairwise_paraphrase")}
    model, tok = cm.model, cm.tokenizer
    if n_trace:
        t1 = time.time()
        agg = trace_average(model, tok, known_trace_cases(cm, n_trace), ("mlp",),
                            window=window)["mlp"]
        ls = agg.effect("last subject token")[0]
        lt = agg.effect("last token")[0]
        out.update({"trace_n": agg.n_prompts, "ate": round(agg.ate, 4),
                    "mlp_last_subject": [round(float(x), 4) for x in ls],
                    "mlp_last_token": [round(float(x), 4) for x in lt],
                    "share_last_subject": round(float(torch.nan_to_num(ls).max()) / agg.ate, 3),
                    "trace_seconds": round(time.time() - t1, 1)})
    from lightning_rome.corpora import as_corpus
    from lightning_rome.stats import get_second_moment
    corpus = as_corpus("wikitext-2").take(2000)
    C: dict[str, torch.Tensor] = {}

    def second_moment(m: Any, t: Any, name: str) -> torch.Tensor:
        if name not in C:
            C[name] = get_second_moment(m, t, name, corpus=corpus, n_samples=None).mom2
        return C[name]

    for layer in layers:
        hp = {"fact_token": "subject_last", **(rome_hp or {}), "layer": layer}
        res = rome_row(model, tok, cm.known_cases[:n_rome], hp, second_moment)
        out[f"rome_L{layer}"] = {k: round(float(v["mean"]), 3) for k, v in res.items()}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", action="append", required=True,
                   help=f"a name of RECIPES ({', '.join(sorted(RECIPES))}) or NAME=JSON overrides")
    p.add_argument("--rome-hp", default="{}",
                   help="JSON overrides of the demo-model ROME preset (fact_token defaults to "
                        "subject_last)")
    p.add_argument("--no-trace", action="store_true", help="skip the averaged trace")
    p.add_argument("--n-trace", type=int, default=100)
    p.add_argument("--n-rome", type=int, default=30)
    p.add_argument("--layers", type=int, nargs="*", default=[0, 1])
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--out", default="demo_recipes.jsonl")
    a = p.parse_args()
    torch.set_num_threads(1)
    rome_hp = json.loads(a.rome_hp)
    for spec in a.recipe:
        name, _, extra = spec.partition("=")
        if extra:
            overrides = json.loads(extra)
        elif name in RECIPES:
            overrides = RECIPES[name]
        else:
            p.error(f"unknown recipe {name!r}: expected one of {sorted(RECIPES)} or NAME=JSON")
        row = {"recipe": name, "rome_hp": rome_hp,
               **measure(overrides, 0 if a.no_trace else a.n_trace, a.n_rome, a.layers,
                         a.window, rome_hp)}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
