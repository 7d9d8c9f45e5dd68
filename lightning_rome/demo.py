"""``lightning-rome demo``: the main job on the embedded default, offline, on the CPU.

It uses a small GPT-2 that knows the true facts of a few hundred real COUNTERFACT cases
(:mod:`lightning_rome.testing.counterfact_model`: trained once on the local COUNTERFACT and
WikiText-2 files, then cached), and then:

1. traces one fact (hidden, MLP and attention) and saves the heatmaps;
2. edits that fact with :class:`~lightning_rome.callbacks.ROMECallback` inside a Trainer and shows
   the completions before and after;
3. applies MEMIT edits of ``n_memit`` other cases in one batch;
4. evaluates ROME (ten cases, one edit at a time) and MEMIT (the batch) on those COUNTERFACT
   cases (ES, PS, NS, S, EM, PM, NM) against the unedited model, logs them to TensorBoard, and
   prints the summary table and the paths it wrote.

The hyperparameters are the ``demo-model`` presets of ``presets/rome.yaml`` and
``presets/memit.yaml``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["known_trace_cases", "rome_row", "run_demo", "trace_average"]

#: Cases evaluated for ROME, one edit at a time.
N_ROME = 10
#: Texts read from WikiText-2 for the second moments C: at most this many (the local
#: validation file has 1,841, and the demo uses them all).
MOM2_SAMPLES = 2000
#: Cases scored per step of the evaluation's progress bar.
SCORE_CHUNK = 10


def _score(model: Any, tok: Any, cases: list[Any], metrics: Any, bar: Any = None) -> None:
    from lightning_rome.modules.evaluator import score_cases

    scores = []
    for s in range(0, len(cases), SCORE_CHUNK):
        scores += score_cases(model, tok, cases[s:s + SCORE_CHUNK])
        if bar is not None:
            bar.update(len(cases[s:s + SCORE_CHUNK]))
    inputs: dict[str, list[list[float]]] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        inputs[f"{kind}_new"] = [s[kind]["nll_new"] for s in scores]
        inputs[f"{kind}_true"] = [s[kind]["nll_true"] for s in scores]
    metrics.update(**inputs)


def known_trace_cases(cm: Any, n: int) -> list[Any]:
    """The first ``n`` cases the model knows (its edit prompts traced for the average)."""
    return list(cm.known_cases[:n])


def trace_average(model: Any, tok: Any, cases: list[Any], kind: str, *, window: int = 1,
                  samples: int = 10, seed: int = 0) -> Any:
    """The causal trace of ``kind`` averaged over the edit prompts of ``cases`` (each traced for
    its true object), as a :class:`~lightning_rome.tracing.TraceAggregate`: the indirect effect
    per token class and layer with 95% intervals, and the total effect."""
    from lightning_rome.tracing import average_traces, trace

    traces = [trace(model, tok, c.request.prompt, c.request.subject, kind=kind, window=window,
                    samples=samples, answer=c.request.target_true, seed=seed + i)
              for i, c in enumerate(cases)]
    return average_traces(traces)


def rome_row(model: Any, tok: Any, cases: list[Any], overrides: dict[str, Any] | None = None,
             second_moment: Any = None, bar: Any = None, on_case: Any = None) -> Any:
    """ROME, one edit at a time (each reverted after scoring), on ``cases`` with the
    ``demo-model`` preset (``overrides`` replaced): :func:`compute_with_ci` of the COUNTERFACT
    metrics without generation. ``on_case(case, patch)`` runs while each edit is applied."""
    from dataclasses import replace

    from lightning_rome.editing import ROME
    from lightning_rome.editing.rome import ROMEHyperParams
    from lightning_rome.metrics import compute_with_ci, counterfact_metrics

    hp = replace(ROMEHyperParams.from_preset("demo-model"), **(overrides or {}))
    rome = ROME(hp, second_moment=second_moment)
    metrics = counterfact_metrics(generation=False)
    for case in cases:
        patch = rome.edit(model, tok, [case.request])
        patch.apply(model)
        try:
            _score(model, tok, [case], metrics, bar)
            if on_case is not None:
                on_case(case, patch)
        finally:
            patch.revert(model)
    return compute_with_ci(metrics)


def run_demo(out: str | os.PathLike[str] = "outputs/demo", n_cases: int | None = None,
             retrain: bool = False, n_memit: int = 100) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out/summary.json``).

    Args:
        out: the output folder.
        n_cases: how many COUNTERFACT cases the model learns (default: the
            :class:`~lightning_rome.testing.CounterFactModelConfig` default, 300; another
            number trains and caches another model).
        retrain: train the model again even when it is cached.
        n_memit: MEMIT edits in the batch (and cases evaluated).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_rome.callbacks import ROMECallback
    from lightning_rome.corpora import as_corpus
    from lightning_rome.editing import MEMIT, ROME
    from lightning_rome.metrics import compute_with_ci, counterfact_metrics, summary_table
    from lightning_rome.scoring import generate
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import CounterFactModelConfig, get_counterfact_model
    from lightning_rome.tracing import trace
    from lightning_rome.utils.paths import DATA_ENV
    from lightning_rome.utils.progress import progress_bar

    if n_memit < 1:
        raise ValueError(f"n_memit must be at least 1, got {n_memit}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if DATA_ENV not in os.environ:
        default = Path(__file__).resolve().parents[2] / "shared" / "data"
        if default.is_dir():
            os.environ[DATA_ENV] = str(default)
    written: list[Path] = []
    t0 = time.time()

    print("1. the COUNTERFACT model")
    config = CounterFactModelConfig() if n_cases is None else CounterFactModelConfig(
        n_cases=n_cases)
    cm = get_counterfact_model(config, retrain=retrain)
    model, tok, st = cm.model, cm.tokenizer, cm.stats
    model_seconds = time.time() - t0
    print(f"   {'loaded from cache' if cm.from_cache else 'trained'} in {model_seconds:.0f} s: "
          f"{cm.path}\n"
          f"   {st.get('n_params', 0):,} parameters; of its {len(cm.cases)} COUNTERFACT cases "
          f"it answers {st.get('accuracy_train', 0):.1%} of the prompts (top-1),\n"
          f"   {st.get('accuracy_neighborhood', 0):.1%} of the neighbourhood prompts and "
          f"{st.get('accuracy_paraphrase', 0):.1%} of the held-out rephrasings "
          f"(P(true) > P(new): {st.get('pairwise_paraphrase', 0):.1%})")
    known = cm.known_cases
    if len(known) < 2:
        raise RuntimeError(f"the demo model knows only {len(known)} of its cases; retrain it "
                           "with --retrain")
    first, cases = known[0], known[1:1 + n_memit]
    if len(cases) < n_memit:
        warnings.warn(f"the model knows {len(known)} cases: MEMIT edits {len(cases)}, not "
                      f"{n_memit}", stacklevel=2)
    request = first.request
    print(f"   {len(known)} cases known on all their prompts; the demo edits "
          f"{1 + len(cases)} of them")

    corpus = as_corpus("wikitext-2")
    stats_corpus = corpus.take(MOM2_SAMPLES)  # no "fewer than n_samples" notice for 1,841
    C: dict[str, torch.Tensor] = {}

    def second_moment(m: Any, t: Any, name: str) -> torch.Tensor:
        if name not in C:  # a progress bar when stderr is a terminal and it takes a while
            C[name] = get_second_moment(m, t, name, corpus=stats_corpus, n_samples=None).mom2
        return C[name]

    print("2. causal trace of one fact")
    for kind in ("hidden", "mlp", "attn"):
        t = trace(model, tok, request.prompt, request.subject, kind=kind, samples=10,
                  window=min(10, model.config.n_layer))
        path = out / f"trace-{kind}.png"
        fig = t.plot()
        fig.savefig(path, bbox_inches="tight")
        written.append(path)
        try:
            import matplotlib.pyplot as plt

            plt.close(fig)
        except ImportError:  # pragma: no cover - plot() needs matplotlib anyway
            pass
    print(f"   {request.text!r}: P({request.target_true}) clean {t.high_score:.3f}, "
          f"subject corrupted {t.low_score:.3f}")

    print(f"3. ROME inside a Trainer (ROMECallback, applied at validation start): "
          f"{request.target_true} -> {request.target_new}")
    logger = TensorBoardLogger(out, name="tensorboard")
    texts = [x for x in corpus.take(64)]

    class _Host(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tok

        def validation_step(self, batch: list[str], batch_idx: int) -> None:
            enc = self.tokenizer(list(batch), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.model.config.n_positions)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            self.log("val_loss", self.model(**enc, labels=labels).loss, batch_size=len(batch))

    shown = [request.text, *first.paraphrase_prompts, *first.neighborhood_prompts]
    def complete(prompts: list[str]) -> list[str]:
        """Greedy completions, cut at the end-of-text token."""
        return [g.split(tok.eos_token)[0] for g in generate(model, tok, prompts,
                                                             max_new_tokens=4)]

    before = complete(shown)
    edit = ROMECallback([request], "demo-model", second_moment=second_moment,
                        apply_on="validation_start", revert=True,
                        save_patch=str(out / "rome-patch.safetensors"))
    captured: dict[str, list[str]] = {}

    class _Show(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            captured["after"] = complete(shown)

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_Show(), edit])
    trainer.validate(_Host(), dataloaders=DataLoader(texts, batch_size=16), verbose=False)
    written.append(out / "rome-patch.safetensors")
    for label, b, a in zip(("edit", "rephrase", "neighbour"), before, captured["after"]):
        print(f"   {label:9s} before: {b!r}\n   {'':9s} after:  {a!r}")
    print(f"   (reverted at validation end: {not edit.applied})")

    print(f"4. MEMIT: {len(cases)} edits in one batch")
    memit = MEMIT("demo-model", second_moment=second_moment)
    t1 = time.time()
    memit_patch = memit.edit(model, tok, [c.request for c in cases])
    memit_seconds = time.time() - t1
    memit_patch.save(out / "memit-patch.safetensors")
    written.append(out / "memit-patch.safetensors")
    print(f"   {memit_seconds:.1f} s ({len(cases) / memit_seconds:.1f} edits/s)")

    print("5. COUNTERFACT metrics on those cases")
    rows: dict[str, Any] = {}
    rome_cases = cases[:N_ROME]
    bar = progress_bar(2 * len(cases) + len(rome_cases), "evaluating", unit="case")
    unedited = counterfact_metrics(generation=False)
    _score(model, tok, cases, unedited, bar)
    rows[f"unedited ({len(cases)} cases)"] = compute_with_ci(unedited)
    rome_metrics = counterfact_metrics(generation=False)
    rome = ROME("demo-model", second_moment=second_moment)
    t1 = time.time()
    for case in rome_cases:  # one ROME edit per case, reverted after scoring
        patch = rome.edit(model, tok, [case.request])
        patch.apply(model)
        _score(model, tok, [case], rome_metrics, bar)
        patch.revert(model)
    rome_seconds = time.time() - t1
    rows[f"ROME ({len(rome_cases)} cases, one at a time)"] = compute_with_ci(rome_metrics)
    memit_metrics = counterfact_metrics(generation=False)
    memit_patch.apply(model)
    _score(model, tok, cases, memit_metrics, bar)
    memit_patch.revert(model)
    bar.close()
    rows[f"MEMIT ({len(cases)} edits at once)"] = compute_with_ci(memit_metrics)
    for i, (label, res) in enumerate(rows.items()):
        logger.log_metrics({f"demo/{label.split()[0]}/{k}": float(v["mean"]) * 100
                            for k, v in res.items()}, step=i)
    logger.finalize("success")
    table = summary_table(rows)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    summary = {
        "rows": rows,
        "model": {"path": str(cm.path), "from_cache": cm.from_cache,
                  "seconds": model_seconds,
                  **{k: v for k, v in st.items() if k != "known_case_ids"}},
        "n_known_cases": len(known),
        "edited_case": first.case_id,
        "completions": {"prompts": shown, "before": before, "after": captured["after"]},
        "memit_case_ids": [c.case_id for c in cases],
        "memit_seconds": memit_seconds,
        "rome_seconds": rome_seconds,
        "seconds": time.time() - t0,
        "from_cache": cm.from_cache,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    written += [out / "summary.md", out / "summary.json", Path(logger.log_dir)]
    print("\nwritten:")
    for p in written:
        print(f"   {p}")
    print(f"total {summary['seconds']:.0f} s")
    return summary
