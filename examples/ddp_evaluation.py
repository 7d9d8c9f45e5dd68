"""Evaluate ROME on COUNTERFACT with DDP: ``EditEvaluator`` under ``Trainer.test`` on several
processes.

Each process edits, scores and reverts its own share of the cases (no case twice) on its own
replica of the model and appends its results to ``cases.rank{r}.jsonl``; the metrics are
synchronised at the end and rank zero writes ``summary.json`` / ``summary.md``; the numbers are
those of a single-process run (``--devices 1 --strategy auto``). Offline on CPU with
``ddp_spawn`` and, by default, the demo's COUNTERFACT model (it knows the true facts of the first
cases of ``counterfact-val.json``, so ES/PS/NS mean something) with its ``demo-model`` preset::

    python examples/ddp_evaluation.py --devices 2 --cases 4
    python examples/ddp_evaluation.py --model gpt2-xl --hparams gpt2-xl --accelerator gpu \\
        --devices 4 --strategy ddp --cases 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_rome.data import CounterFactDataModule
from lightning_rome.editing import get_editor
from lightning_rome.modules import EditEvaluator


class SpawnSafeEditor:
    """Builds the editor in each process on first use. ``ddp_spawn`` pickles the module for
    every process, and ROME/MEMIT editors keep per-model caches (weak references) that do not
    pickle; with ``strategy="ddp"`` (a fresh script per process) ``editor="rome"`` works as is."""

    def __init__(self, method: str, hparams: Any) -> None:
        self.method, self.hparams, self._editor = method, hparams, None

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "hparams": self.hparams, "_editor": None}

    def edit(self, model: torch.nn.Module, tokenizer: Any, requests: Any) -> Any:
        if self._editor is None:
            self._editor = get_editor(self.method, self.hparams)
        return self._editor.edit(model, tokenizer, requests)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub name or local folder (default: the "
                   "offline COUNTERFACT demo model)")
    p.add_argument("--hparams", default=None, help="ROME preset (default: demo-model, or "
                   "gpt2-xl with --model)")
    p.add_argument("--data", default="counterfact/counterfact-val.json",
                   help="COUNTERFACT file (relative to $LIGHTNING_ROME_DATA)")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--strategy", default="ddp_spawn")
    p.add_argument("--out", default="outputs/ddp-evaluation")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model is None:
        from lightning_rome.testing import get_counterfact_model

        model: Any = str(get_counterfact_model().path)  # each process loads its own replica
        hparams = args.hparams or "demo-model"
    else:
        model, hparams = args.model, args.hparams or "gpt2-xl"
    out = Path(args.out)
    editor: Any = SpawnSafeEditor("rome", hparams) if args.strategy == "ddp_spawn" else "rome"
    evaluator = EditEvaluator(model, editor=editor,
                              hparams=None if args.strategy == "ddp_spawn" else hparams,
                              results_dir=str(out), resume=False, label="ROME")
    dm = CounterFactDataModule(args.data, limit=args.cases)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices,
                         strategy=args.strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.test(evaluator, datamodule=dm, verbose=False)
    summary = json.loads((out / "summary.json").read_text())
    per_rank = {f.name: [json.loads(line)["case_id"] for line in f.read_text().splitlines()
                         if line.strip()] for f in sorted(out.glob("cases.rank*.jsonl"))}
    print(f"{summary['n_cases']} cases on {args.devices} processes: "
          f"{ {k: len(v) for k, v in per_rank.items()} }\n{summary['table']}")
    return {"summary": summary, "per_rank": per_rank}


if __name__ == "__main__":
    main()
