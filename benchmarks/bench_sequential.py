"""Sequential (lifelong) editing on the synthetic fact model: ROME, MEMIT and AlphaEdit.

N counterfactual edits of the default fact model's facts are applied in batches of b, each batch
on the model left by the earlier ones; after every k batches the benchmark measures efficacy,
paraphrase and neighbourhood scores over all edits so far, accuracy on the facts of 40 held-out
subjects, GE and the accumulated update's norm (:mod:`lightning_rome.evaluation.sequential`).
Runs resume from their results folders. Usage::

    python -m benchmarks.bench_sequential                      # N = 100, b = 1 and 10
    python -m benchmarks.bench_sequential --n 100 --b 1 --methods alphaedit
    python -m benchmarks.bench_sequential --out outputs/seq    # results, curves.png, table

The baselines use the settings of ``tests/editing/test_memit_behaviour.py`` (last token, 25 value
steps, clamp 12, C from 2,000 of the model's training sentences); AlphaEdit its ``fact-model``
preset. Nothing is asserted here: the slow test ``tests/evaluation/test_sequential_slow.py``
checks the done-when figures; ``benchmarks/RESULTS.md`` records the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine_line

COMMON: dict[str, Any] = {"v_num_grad_steps": 25, "clamp_norm_factor": 12.0,
                          "v_weight_decay": 0.01, "context_template_lengths": [[6, 2]],
                          "context_template_starts": None, "key_average": "templates",
                          "mom2_n_samples": 2000, "fact_token": "last"}
HPARAMS: dict[str, Any] = {
    "rome": {**COMMON, "layer": 0},
    "memit": {**COMMON, "layers": [0, 1], "mom2_update_weight": 100.0, "z_batch_size": 100},
    "alphaedit": "fact-model",
}
COLUMNS = ("efficacy", "paraphrase", "neighborhood", "retain_accuracy", "fluency", "update_norm")


def make_editor(method: str, corpus: list[str], hparams: Any = None) -> Any:
    """The method's editor (``hparams``, default :data:`HPARAMS`) with its statistics over
    ``corpus`` (the fact model's sentences)."""
    from lightning_rome.editing import get_editor
    from lightning_rome.stats import get_second_moment

    hparams = HPARAMS[method] if hparams is None else hparams
    if method == "alphaedit":
        return get_editor(method, hparams, corpus=corpus)

    def second_moment(model: Any, tok: Any, name: str) -> Any:
        return get_second_moment(model, tok, name, corpus=corpus, n_samples=2000,
                                 progress=False).mom2

    return get_editor(method, hparams, second_moment=second_moment)


def alphaedit_variant(l2_weight: float) -> dict[str, Any]:
    """The ``fact-model`` preset with another α."""
    from lightning_rome.editing.hparams import load_preset_file

    return {**load_preset_file("alphaedit")["fact-model"], "l2_weight": l2_weight}


def run_one(method: str, n: int, b: int, eval_every: int, out: Path, fluency: bool = True,
            hparams: Any = None, label: str | None = None) -> dict[str, Any]:
    """One (method, N, b) run, resumed from ``out`` when interrupted; returns its summary.
    ``hparams`` overrides :data:`HPARAMS` (``label`` then names the run)."""
    import torch

    from lightning_rome.evaluation import SequentialSettings, fact_model_benchmark, run_sequential
    from lightning_rome.testing import get_fact_model

    torch.set_num_threads(1)
    fm = get_fact_model()
    cases, retain, prompts = fact_model_benchmark(fm, n)
    editor = make_editor(method, list(fm.kb.text_corpus()), hparams)
    label = label or method
    folder = out / f"{label}-n{n}-b{b}"
    t0 = time.perf_counter()
    res = run_sequential(fm.model, fm.tokenizer, editor, cases, retain=retain,
                         fluency_prompts=prompts if fluency else (),
                         settings=SequentialSettings(batch_size=b, eval_every=eval_every),
                         results_dir=folder)
    first, last = res.points[0], res.points[-1]
    return {"method": label, "n": n, "b": b, "folder": str(folder), "points": res.points,
            "unedited": {k: first[k] for k in COLUMNS},
            "final": {k: last[k] for k in COLUMNS},
            "edit_seconds": last["edit_seconds"], "wall_seconds": time.perf_counter() - t0,
            "batches_run": res.batches_run}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100])
    p.add_argument("--b", type=int, nargs="+", default=[1, 10])
    p.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit"])
    p.add_argument("--eval-every-edits", type=int, default=10,
                   help="measure after every this many edits (k = this / b, at least 1)")
    p.add_argument("--alphaedit-l2", type=float, nargs="*", default=[1.5],
                   help="extra AlphaEdit runs with the fact-model preset at these α (l2_weight)")
    p.add_argument("--no-fluency", action="store_true")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_sequential"))
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for n in args.n:
        for b in args.b:
            for method in args.methods:
                k = max(1, args.eval_every_edits // b)
                runs: list[tuple[Any, str | None]] = [(None, None)]
                if method == "alphaedit":
                    runs += [(alphaedit_variant(a), f"alphaedit-a{a:g}")
                             for a in args.alphaedit_l2]
                for hp, label in runs:
                    rows.append(run_one(method, n, b, k, out, fluency=not args.no_fluency,
                                        hparams=hp, label=label))
                    r = rows[-1]
                    print(f"{r['method']:<14} N={n:<5} b={b:<3} " + " ".join(
                        f"{c}={r['final'][c]:.3f}" for c in COLUMNS if r["final"][c] is not None)
                        + f" edit_s={r['edit_seconds']:.0f}", flush=True)
    from lightning_rome.modules.sequential import plot_curves

    for n in args.n:
        for b in args.b:
            sel = {r["method"]: r["points"] for r in rows if r["n"] == n and r["b"] == b}
            plot_curves(sel, out / f"curves-n{n}-b{b}.png", title=f"fact model, N={n}, b={b}")
    print(machine_line())
    print("| method | N | b | efficacy | paraphrase | neighbourhood | retain acc. (unedited) | "
          "GE (unedited) | ‖ΔW‖ | edit s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, u = r["final"], r["unedited"]
        ge = "–" if f["fluency"] is None else f"{f['fluency']:.3f} ({u['fluency']:.3f})"
        print(f"| {r['method']} | {r['n']} | {r['b']} | {f['efficacy']:.3f} | "
              f"{f['paraphrase']:.3f} | {f['neighborhood']:.3f} | "
              f"{f['retain_accuracy']:.3f} ({u['retain_accuracy']:.3f}) | {ge} | "
              f"{f['update_norm']:.1f} | {r['edit_seconds']:.0f} |")
    (out / "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "points"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
