"""``lightning-rome demo``: the main job on the embedded default, offline, on the CPU.

It uses the small fact-knowing GPT-2 of :mod:`lightning_rome.testing` (trained once on a
synthetic knowledge base and cached), and then:

1. traces one fact (hidden, MLP and attention) and saves the heatmaps;
2. edits one fact with :class:`~lightning_rome.callbacks.ROMECallback` inside a Trainer and shows
   the completions before and after;
3. applies a batch of MEMIT edits at once;
4. evaluates both with the COUNTERFACT metrics (ES, PS, NS, S, EM, PM, NM) against the unedited
   model, logging to TensorBoard, and prints the summary table and the paths it wrote.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_demo"]


def _cases(fm: Any, requests: list[Any], n_neighbors: int = 4) -> list[Any]:
    """COUNTERFACT-style cases from the knowledge base: held-out paraphrase templates, and
    neighbourhood prompts about other subjects whose true object is the edit's ``o^c``."""
    from lightning_rome.data import EditCase

    kb = fm.kb
    cases = []
    for r in requests:
        fact = kb.fact_of(r)
        neigh = [f for f in kb.neighbor_facts(r, 3 * n_neighbors) if f.object == r.target_true]
        neigh = neigh[:n_neighbors]
        cases.append(EditCase(
            request=r,
            paraphrase_prompts=tuple(t.replace("{}", r.subject) for t in
                                     fact.prompts("paraphrase")),
            neighborhood_prompts=tuple(f.prompts("train")[0].replace("{}", f.subject)
                                       for f in neigh),
            neighborhood_answers=tuple(f.object for f in neigh),
            source="counterfact"))
    return cases


def _score(model: Any, tok: Any, cases: list[Any], metrics: Any) -> None:
    from lightning_rome.modules.evaluator import score_cases

    scores = score_cases(model, tok, cases)
    inputs: dict[str, list[list[float]]] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        inputs[f"{kind}_new"] = [s[kind]["nll_new"] for s in scores]
        inputs[f"{kind}_true"] = [s[kind]["nll_true"] for s in scores]
    metrics.update(**inputs)


def run_demo(out: str | os.PathLike[str] = "outputs/demo", n_cases: int | None = None,
             retrain: bool = False, n_memit: int = 100) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out/summary.json``)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_rome.callbacks import ROMECallback
    from lightning_rome.editing import MEMIT
    from lightning_rome.metrics import compute_with_ci, counterfact_metrics, summary_table
    from lightning_rome.scoring import generate
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import get_fact_model
    from lightning_rome.tracing import trace
    from lightning_rome.utils.paths import DATA_ENV

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if DATA_ENV not in os.environ:
        default = Path(__file__).resolve().parents[2] / "shared" / "data"
        if default.is_dir():
            os.environ[DATA_ENV] = str(default)
    written: list[Path] = []
    t0 = time.time()

    print("1. the fact-knowing model")
    fm = get_fact_model(retrain=retrain)
    model, tok, kb = fm.model, fm.tokenizer, fm.kb
    print(f"   {'loaded from cache' if fm.from_cache else 'trained'}: {fm.path}\n"
          f"   {fm.stats.get('n_params', 0):,} parameters, knows "
          f"{fm.stats.get('accuracy_train', 0):.1%} of {len(kb.facts)} facts "
          f"({fm.stats.get('accuracy_paraphrase', 0):.1%} on held-out paraphrases)")
    corpus = list(kb.text_corpus())
    C: dict[str, torch.Tensor] = {}

    def second_moment(m: Any, t: Any, name: str) -> torch.Tensor:
        if name not in C:
            C[name] = get_second_moment(m, t, name, corpus=corpus, n_samples=2000,
                                        progress=False).mom2
        return C[name]

    n = n_cases or n_memit
    requests = fm.edit_requests(n + 1, seed=0)
    first, batch = requests[0], requests[1:]

    print("2. causal trace of one fact")
    for kind in ("hidden", "mlp", "attn"):
        t = trace(model, tok, first.prompt, first.subject, kind=kind, samples=10,
                  window=min(10, model.config.n_layer))
        path = out / f"trace-{kind}.png"
        t.plot().savefig(path, bbox_inches="tight")
        written.append(path)
    print(f"   {first.text!r}: P({first.target_true}) clean {t.high_score:.3f}, "
          f"corrupted {t.low_score:.3f}")

    print("3. ROME inside a Trainer (ROMECallback, applied at validation start)")
    logger = TensorBoardLogger(out, name="tensorboard")

    class _Host(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tok

        def validation_step(self, texts: list[str], batch_idx: int) -> None:
            enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            self.log("val_loss", self.model(**enc, labels=labels).loss, batch_size=len(texts))

    before = generate(model, tok, [first.text], max_new_tokens=4)[0]
    edit = ROMECallback([first], "fact-model", second_moment=second_moment,
                        apply_on="validation_start", revert=True, save_patch=str(
                            out / "rome-patch.safetensors"))
    captured: dict[str, str] = {}

    class _Show(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            captured["after"] = generate(model, tok, [first.text], max_new_tokens=4)[0]

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_Show(), edit])
    trainer.validate(_Host(), dataloaders=DataLoader(corpus[:64], batch_size=16), verbose=False)
    written.append(out / "rome-patch.safetensors")
    print(f"   before: {before!r}\n   after:  {captured['after']!r}\n"
          f"   (reverted at validation end: {not edit.applied})")

    print(f"4. MEMIT: {len(batch)} edits in one batch")
    memit = MEMIT({"layers": [0, 1], "v_num_grad_steps": 25, "clamp_norm_factor": 12.0,
                   "v_weight_decay": 0.01, "mom2_update_weight": 100.0,
                   "context_template_lengths": [[5, 2]], "z_batch_size": 100},
                  second_moment=second_moment)
    t1 = time.time()
    memit_patch = memit.edit(model, tok, batch)
    memit_seconds = time.time() - t1
    memit_patch.save(out / "memit-patch.safetensors")
    written.append(out / "memit-patch.safetensors")
    print(f"   {memit_seconds:.1f} s ({len(batch) / memit_seconds:.1f} edits/s)")

    print("5. COUNTERFACT metrics on those cases")
    cases = _cases(fm, batch)
    rows: dict[str, Any] = {}
    unedited = counterfact_metrics(generation=False)
    _score(model, tok, cases, unedited)
    rows["unedited"] = compute_with_ci(unedited)
    rome_metrics = counterfact_metrics(generation=False)
    from lightning_rome.editing import ROME

    rome = ROME("fact-model", second_moment=second_moment)
    rome_cases = cases[: min(10, len(cases))]
    for case in rome_cases:  # one ROME edit per case, reverted after scoring
        patch = rome.edit(model, tok, [case.request])
        patch.apply(model)
        _score(model, tok, [case], rome_metrics)
        patch.revert(model)
    rows[f"ROME ({len(rome_cases)} cases, one at a time)"] = compute_with_ci(rome_metrics)
    memit_metrics = counterfact_metrics(generation=False)
    memit_patch.apply(model)
    _score(model, tok, cases, memit_metrics)
    memit_patch.revert(model)
    rows[f"MEMIT ({len(batch)} edits at once)"] = compute_with_ci(memit_metrics)
    for i, (label, res) in enumerate(rows.items()):
        logger.log_metrics({f"demo/{label.split()[0]}/{k}": float(v["mean"]) * 100
                            for k, v in res.items()}, step=i)
    table = summary_table(rows)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    summary = {"rows": rows, "memit_seconds": memit_seconds, "seconds": time.time() - t0,
               "from_cache": fm.from_cache}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    written += [out / "summary.md", out / "summary.json", Path(logger.log_dir)]
    print("\nwritten:")
    for p in written:
        print(f"   {p}")
    print(f"total {summary['seconds']:.0f} s")
    return summary
