"""``lightning-rome demo``: the main job on the embedded default, offline, on the CPU.

It uses a small GPT-2 that knows the true facts of a few hundred real COUNTERFACT cases
(:mod:`lightning_rome.testing.counterfact_model`: trained once on the local COUNTERFACT and
WikiText-2 files, then cached), and then:

1. averages the causal traces (hidden, MLP, attention; window 1) of ``n_trace`` known facts:
   the indirect effect per token class and layer with 95% intervals (the paper's Figure 2
   heatmaps and line plots), saved and logged to TensorBoard;
2. edits ``n_rome`` cases with ROME as published (at the subject's last token), one at a time,
   each computed on the unedited model and reverted after scoring (their value optimisations
   run in batches: :meth:`~lightning_rome.editing.ROME.edit_each`);
3. picks a typical one of them (its ES / PS / NS outcome is the majority's), traces it, and edits
   it with :class:`~lightning_rome.callbacks.ROMECallback` inside a Trainer, printing the
   completions of its prompt, paraphrase and neighbourhood prompt before and after;
4. applies MEMIT to ``n_memit`` cases in one batch;
5. prints the COUNTERFACT table (S, ES, PS, NS, EM, PM, NM with 95% intervals) of the unedited
   model, ROME and MEMIT, logs it to TensorBoard, and lists the paths it wrote.

The hyperparameters are the ``demo-model`` presets of ``presets/rome.yaml`` and
``presets/memit.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["known_trace_cases", "outcome", "rome_row", "run_demo", "trace_average",
           "typical_index"]

#: Cases evaluated for ROME, one edit at a time.
N_ROME = 50
#: Known facts whose causal traces the demo averages.
N_TRACE = 100
#: The trace kinds, in the paper's order.
KINDS = ("hidden", "mlp", "attn")
#: Texts read from WikiText-2 for the second moments C: at most this many (the local
#: validation file has 1,841, and the demo uses them all).
MOM2_SAMPLES = 2000
#: Cases scored per step of the evaluation's progress bar.
SCORE_CHUNK = 10
#: ROME's single edits: the value optimisations of this many run in one batch
#: (:meth:`~lightning_rome.editing.ROME.edit_each`; each edit is still computed alone).
ROME_BATCH = 8
#: GE (the papers' fluency: the weighted bi- and trigram entropy of generated text): per case,
#: this many new tokens sampled top-5 (as the evaluation's defaults sample) after each of its
#: generation prompts (:func:`generation_prompts`).
GE_TOKENS = 50


def demo_metrics(ge: bool) -> Any:
    """COUNTERFACT's metrics without generation, plus GE when ``ge`` (RS is left out: it needs
    ROME's IDF tables, which the offline data does not have)."""
    from lightning_rome.metrics import GenerationEntropy, counterfact_metrics

    metrics = counterfact_metrics(generation=False)
    if ge:
        metrics.add_metrics({"GE": GenerationEntropy()})
    return metrics


def generation_prompts(model: Any, tok: Any, case: Any) -> list[str]:
    """A case's prompts for GE: its edit prompt and first paraphrase (the offline COUNTERFACT
    file has no generation prompts of its own), those with room for ``GE_TOKENS`` more tokens
    in the model's positions (the same prompts for a case in every row of the table).

    Raises:
        ValueError: not even the edit prompt leaves room.
    """
    from lightning_rome.scoring import learned_position_limit
    from lightning_rome.tokens import encode_prompt

    limit = learned_position_limit(model)
    prompts = [p for p in (case.request.text, *case.paraphrase_prompts[:1])
               if limit is None or len(encode_prompt(tok, p)) + GE_TOKENS - 1 <= limit]
    if not prompts:
        raise ValueError(f"case {case.case_id!r}: its edit prompt leaves no room for "
                         f"{GE_TOKENS} generated tokens in {limit} positions")
    return prompts


def generate_for_ge(model: Any, tok: Any, cases: list[Any], seed: int) -> list[list[str]]:
    """Per case, the texts (prompt + ``GE_TOKENS`` sampled tokens) of its
    :func:`generation_prompts`, all in one batched call with a generator seeded by ``seed``."""
    from lightning_rome.scoring import generate, model_device

    per_case = [generation_prompts(model, tok, c) for c in cases]
    gen = torch.Generator(device=model_device(model)).manual_seed(seed)
    texts = generate(model, tok, [p for ps in per_case for p in ps], max_new_tokens=GE_TOKENS,
                     top_k=5, generator=gen)
    out, i = [], 0
    for ps in per_case:
        out.append(texts[i:i + len(ps)])
        i += len(ps)
    return out


def _score(model: Any, tok: Any, cases: list[Any], metrics: Any, bar: Any = None,
           ge_seed: int | None = None) -> list[dict[str, Any]]:
    """Score ``cases`` into ``metrics`` (and their GE texts, sampled with ``ge_seed``, when it is
    given); returns the per-case scores of
    :func:`~lightning_rome.modules.evaluator.score_cases`."""
    from lightning_rome.modules.evaluator import score_cases

    scores: list[dict[str, Any]] = []
    for s in range(0, len(cases), SCORE_CHUNK):
        scores += score_cases(model, tok, cases[s:s + SCORE_CHUNK])
        if bar is not None:
            bar.update(len(cases[s:s + SCORE_CHUNK]))
    inputs: dict[str, list[list[float]]] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        inputs[f"{kind}_new"] = [s[kind]["nll_new"] for s in scores]
        inputs[f"{kind}_true"] = [s[kind]["nll_true"] for s in scores]
    if ge_seed is not None:
        metrics.update(**inputs, generated_texts=generate_for_ge(model, tok, cases, ge_seed))
    else:
        metrics.update(**inputs)
    return scores


def outcome(score: dict[str, Any]) -> tuple[bool, bool, bool]:
    """One edited case's ``(efficacy, paraphrase, neighbourhood)`` success, COUNTERFACT's strict
    comparisons of ``P = exp(-mean NLL)`` on its first prompt of each kind: ``P[o*] > P[o^c]`` on
    the edit prompt and on the paraphrase, ``P[o^c] > P[o*]`` on the neighbourhood prompt."""
    def p(kind: str, which: str) -> float:
        return math.exp(-float(score[kind][f"nll_{which}"][0]))

    return (p("rewrite", "new") > p("rewrite", "true"),
            p("paraphrase", "new") > p("paraphrase", "true"),
            p("neighborhood", "true") > p("neighborhood", "new"))


def typical_index(outcomes: list[tuple[bool, bool, bool]]) -> int:
    """The first case whose outcome is the majority one on each of ES, PS and NS (so that a
    headline example shows what the averages show), or 0 when no case has that pattern."""
    if not outcomes:
        raise ValueError("typical_index needs at least one outcome")
    n = len(outcomes)
    majority = tuple(2 * sum(o[k] for o in outcomes) >= n for k in range(3))
    return next((i for i, o in enumerate(outcomes) if o == majority), 0)


def _trace_summary(aggs: dict[str, Any]) -> dict[str, Any]:
    """Per kind and token class (last subject token, last token): the peak indirect effect over
    layers, its layer and its share of the total effect."""
    out: dict[str, Any] = {"ate": float(aggs["hidden"].ate)}
    for kind, agg in aggs.items():
        out[kind] = {}
        for cls in ("last subject token", "last token"):
            aie = torch.nan_to_num(agg.effect(cls)[0], nan=float("-inf"))  # (L,)
            layer = int(aie.argmax())
            peak = float(aie[layer])
            out[kind][cls] = {"peak": peak, "layer": layer,
                              "share": peak / agg.ate if agg.ate > 0 else float("nan")}
    return out


def known_trace_cases(cm: Any, n: int) -> list[Any]:
    """The first ``n`` cases the model knows (its edit prompts traced for the average)."""
    return list(cm.known_cases[:n])


def trace_average(model: Any, tok: Any, cases: list[Any], kinds: Sequence[str] = KINDS, *,
                  window: int = 1, samples: int = 10, seed: int = 0) -> dict[str, Any]:
    """The causal traces of ``kinds`` averaged over the edit prompts of ``cases`` (each traced
    for its true object): per kind a :class:`~lightning_rome.tracing.TraceAggregate`, the
    indirect effect per token class and layer with 95% intervals, and the total effect. Each
    prompt's kinds share its clean and corrupted runs (:func:`~lightning_rome.tracing.trace_all`).
    The subjects are corrupted with Gaussian noise of ``ν = 3σ``, σ measured over the embeddings
    of all the cases' subjects (as the paper measures it over its dataset's)."""
    from lightning_rome.tracing import GaussianNoise, average_traces, trace_all

    noise = GaussianNoise.from_subjects(model, tok, [c.request.subject for c in cases])
    per_case = [list(trace_all(model, tok, c.request.prompt, c.request.subject, list(kinds),
                               window=window, samples=samples, noise=noise,
                               answer=c.request.target_true, seed=seed + i).values())
                for i, c in enumerate(cases)]  # [case][kind]
    return {kind: average_traces([traces[k] for traces in per_case])
            for k, kind in enumerate(kinds)}


def rome_row(model: Any, tok: Any, cases: list[Any], overrides: dict[str, Any] | None = None,
             second_moment: Any = None, bar: Any = None, on_case: Any = None,
             ge_seed: int | None = None) -> Any:
    """ROME, one edit at a time (each computed on the unedited model, the value optimisations
    of ``ROME_BATCH`` at once, and each reverted after scoring), on ``cases`` with the
    ``demo-model`` preset (``overrides`` replaced): :func:`compute_with_ci` of the COUNTERFACT
    metrics (with GE when ``ge_seed`` is given: each edited case's texts sampled with that seed).
    ``bar`` (``update(n)``) advances once per edit computed and once per case scored.
    ``on_case(case, patch, score)`` runs while each edit is applied, ``score`` the case's
    :func:`~lightning_rome.modules.evaluator.score_cases` entry."""
    from dataclasses import replace

    from lightning_rome.editing import ROME
    from lightning_rome.editing.rome import ROMEHyperParams
    from lightning_rome.metrics import compute_with_ci

    hp = replace(ROMEHyperParams.from_preset("demo-model"), **(overrides or {}))
    rome = ROME(hp, second_moment=second_moment)
    metrics = demo_metrics(ge=ge_seed is not None)
    # Each patch is computed on the unedited model, alone (its value optimisation batched).
    patches = rome.edit_each(model, tok, [c.request for c in cases], batch_size=ROME_BATCH,
                             progress=None if bar is None else bar.update)
    for case, patch in zip(cases, patches):
        patch.apply(model)
        try:
            (score,) = _score(model, tok, [case], metrics, bar, ge_seed=ge_seed)
            if on_case is not None:
                on_case(case, patch, score)
        finally:
            patch.revert(model)
    return compute_with_ci(metrics)


def run_demo(out: str | os.PathLike[str] = "outputs/demo", n_cases: int | None = None,
             retrain: bool = False, n_memit: int = 100, n_rome: int = N_ROME,
             n_trace: int = N_TRACE, seed: int = 0) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out/summary.json``).

    Args:
        out: the output folder.
        n_cases: how many COUNTERFACT cases the model learns (default: the
            :class:`~lightning_rome.testing.CounterFactModelConfig` default; another number
            trains and caches another model).
        retrain: train the model again even when it is cached.
        n_memit: MEMIT edits in the batch (and cases evaluated).
        n_rome: cases edited by ROME, one at a time (and evaluated).
        n_trace: known facts whose causal traces are averaged.
        seed: the seed of the traces' noise and of the context templates ROME and MEMIT sample
            from the model (the model itself is trained with its config's seed: its cache is
            keyed by the config).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_rome.callbacks import ROMECallback
    from lightning_rome.callbacks._common import log_text
    from lightning_rome.corpora import as_corpus
    from lightning_rome.editing import MEMIT, MEMITHyperParams, ROMEHyperParams
    from lightning_rome.metrics import compute_with_ci, summary_table
    from lightning_rome.scoring import generate
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import CounterFactModelConfig, get_counterfact_model
    from lightning_rome.tracing import trace
    from lightning_rome.tracing.plot import plot_average, plot_average_lines, save_and_log_figure
    from lightning_rome.utils.paths import DATA_ENV
    from lightning_rome.utils.progress import progress_bar

    for name, n in (("n_memit", n_memit), ("n_rome", n_rome), ("n_trace", n_trace)):
        if n < 1:
            raise ValueError(f"{name} must be at least 1, got {n}")
    # One thread: on this tiny model two threads on busy cores were measured 25x slower (tracing).
    torch.set_num_threads(1)
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
    for name, n in (("MEMIT edits", n_memit), ("ROME edits", n_rome), ("traces", n_trace)):
        if len(known) < n:
            warnings.warn(f"the model knows {len(known)} cases: {len(known)} {name}, not {n}",
                          stacklevel=2)
    memit_cases, rome_cases = known[:n_memit], known[:n_rome]
    print(f"   {len(known)} cases known on all their prompts")
    logger = TensorBoardLogger(out, name="tensorboard")

    def save(fig: Any, name: str) -> None:
        path = save_and_log_figure(fig, out / name, logger, f"demo/{Path(name).stem}")
        written.append(path)
        try:
            import matplotlib.pyplot as plt

            plt.close(fig)
        except ImportError:  # pragma: no cover - the plots need matplotlib anyway
            pass

    corpus = as_corpus("wikitext-2")
    stats_corpus = corpus.take(MOM2_SAMPLES)  # no "fewer than n_samples" notice for 1,841
    C: dict[str, torch.Tensor] = {}

    def second_moment(m: Any, t: Any, name: str) -> torch.Tensor:
        if name not in C:  # a progress bar when stderr is a terminal and it takes a while
            C[name] = get_second_moment(m, t, name, corpus=stats_corpus, n_samples=None).mom2
        return C[name]

    trace_cases = known_trace_cases(cm, n_trace)
    print(f"2. causal traces averaged over {len(trace_cases)} known facts (window 1)")
    t1 = time.time()
    aggs = trace_average(model, tok, trace_cases, KINDS, seed=seed)
    for kind, agg in aggs.items():
        save(plot_average(agg), f"trace-average-{kind}.png")
    save(plot_average_lines({"hidden": aggs["hidden"], "MLP": aggs["mlp"],
                             "Attn": aggs["attn"]}), "trace-average-lines.png")
    save(plot_average_lines(aggs["mlp"], token_class=None), "trace-average-mlp-classes.png")
    trace_summary = _trace_summary(aggs)
    print(f"   total effect {trace_summary['ate']:.3f}; peak indirect effect over layers "
          f"(share of the total effect):")
    for kind in KINDS:
        peaks = trace_summary[kind]
        print(f"   {kind:6s} " + ", ".join(
            f"{c} {peaks[c]['peak']:.3f} ({peaks[c]['share']:.0%}, layer {peaks[c]['layer']})"
            for c in ("last subject token", "last token")))
    logger.log_metrics({f"trace/{kind}/share_{c.replace(' ', '_')}": v["share"]
                        for kind in KINDS for c, v in trace_summary[kind].items()}, step=0)
    trace_seconds = time.time() - t1

    print(f"3. ROME as published (at the subject's last token): {len(rome_cases)} single edits")
    outcomes: list[tuple[bool, bool, bool]] = []
    # Two steps per case: its edit computed (in batches), then its scores and samples.
    bar = progress_bar(2 * len(rome_cases), "ROME: edits, then scores", unit="step")
    t1 = time.time()
    rome_row_ = rome_row(model, tok, rome_cases, {"seed": seed}, second_moment=second_moment,
                         bar=bar, ge_seed=seed,
                         on_case=lambda case, patch, score: outcomes.append(outcome(score)))
    bar.close()
    rome_seconds = time.time() - t1
    n = len(outcomes)
    es, ps, ns = (sum(o[k] for o in outcomes) for k in range(3))
    print(f"   {rome_seconds:.1f} s; new object preferred on {es}/{n} edit prompts and {ps}/{n} "
          f"paraphrases, true object kept on {ns}/{n} neighbourhood prompts")

    first = rome_cases[typical_index(outcomes)]
    request = first.request
    print(f"4. a typical one of them (its outcome is the majority's), edited inside a Trainer "
          f"(ROMECallback, applied at validation start): {request.target_true} -> "
          f"{request.target_new}")
    for kind in ("hidden", "mlp", "attn"):
        t = trace(model, tok, request.prompt, request.subject, kind=kind, samples=10, window=1,
                  answer=request.target_true, seed=seed)
        save(t.plot(), f"trace-{kind}.png")
    print(f"   its trace: {request.text!r}: P({request.target_true}) clean {t.high_score:.3f}, "
          f"subject corrupted {t.low_score:.3f}")
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
    rome_hp = {**ROMEHyperParams.from_preset("demo-model").to_dict(), "seed": seed}
    edit = ROMECallback([request], rome_hp, second_moment=second_moment,
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
    labels = ("edit", "rephrase", "neighbour")
    lines = []
    for label, b, a in zip(labels, before, captured["after"]):
        print(f"   {label:9s} before: {b!r}\n   {'':9s} after:  {a!r}")
        lines.append(f"| {label} | `{b}` | `{a}` |")
    print(f"   (reverted at validation end: {not edit.applied})")
    log_text([logger], "demo/rome_example",
             f"{request.target_true} -> {request.target_new}\n\n| prompt | before | after |\n"
             "|---|---|---|\n" + "\n".join(lines), step=0)

    print(f"5. MEMIT: {len(memit_cases)} edits in one batch")
    memit = MEMIT({**MEMITHyperParams.from_preset("demo-model").to_dict(), "seed": seed},
                  second_moment=second_moment)
    t1 = time.time()
    memit_patch = memit.edit(model, tok, [c.request for c in memit_cases])
    memit_seconds = time.time() - t1
    memit_patch.save(out / "memit-patch.safetensors")
    written.append(out / "memit-patch.safetensors")
    print(f"   {memit_seconds:.1f} s ({len(memit_cases) / memit_seconds:.1f} edits/s)")

    print(f"6. COUNTERFACT metrics (GE from {GE_TOKENS}-token samples after each case's edit prompt "
          "and paraphrase)")
    scored = known[:max(n_memit, n_rome)]
    rows: dict[str, Any] = {}
    bar = progress_bar(len(scored) + len(memit_cases), "evaluating", unit="case")
    unedited = demo_metrics(ge=True)
    _score(model, tok, scored, unedited, bar, ge_seed=seed)
    rows[f"unedited ({len(scored)} cases)"] = compute_with_ci(unedited)
    rows[f"ROME ({len(rome_cases)} cases, one at a time)"] = rome_row_
    memit_metrics = demo_metrics(ge=True)
    memit_patch.apply(model)
    _score(model, tok, memit_cases, memit_metrics, bar, ge_seed=seed)
    memit_patch.revert(model)
    bar.close()
    rows[f"MEMIT ({len(memit_cases)} edits at once)"] = compute_with_ci(memit_metrics)
    for i, (label, res) in enumerate(rows.items()):
        logger.log_metrics({f"demo/{label.split()[0]}/{k}": float(v["mean"]) * 100
                            for k, v in res.items()}, step=i)
    table = summary_table(rows)
    log_text([logger], "demo/summary", table, step=0)
    logger.finalize("success")
    print(table)
    (out / "summary.md").write_text(table + "\n")
    summary = {
        "rows": rows,
        "model": {"path": str(cm.path), "from_cache": cm.from_cache,
                  "seconds": model_seconds,
                  **{k: v for k, v in st.items() if k != "known_case_ids"}},
        "n_known_cases": len(known),
        "trace": {"n": len(trace_cases), **trace_summary},
        "edited_case": first.case_id,
        "example": {"prompt": request.text, "true": request.target_true,
                    "new": request.target_new},
        "rome_case_ids": [c.case_id for c in rome_cases],
        "rome_outcomes": [list(o) for o in outcomes],
        "completions": {"prompts": shown, "before": before, "after": captured["after"]},
        "memit_case_ids": [c.case_id for c in memit_cases],
        "memit_seconds": memit_seconds,
        "rome_seconds": rome_seconds,
        "trace_seconds": trace_seconds,
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
