"""Trace a dataset of known facts and find the layer to edit.

Runs :class:`~lightning_rome.tracing.CausalTracer` under ``Trainer.test`` over the first facts of
``known_1000.json`` (a :class:`~lightning_rome.data.KnownFactsDataModule`), averages the traces
(AIE per token class and layer, ATE), saves the averaged MLP heatmap and prints the layer
:func:`~lightning_rome.tracing.suggest_edit_layer` proposes (the MLP peak at the last subject
token, the layer ROME edits)::

    python examples/trace_dataset.py --facts 10 --out outputs/trace-dataset
    python examples/trace_dataset.py --model gpt2-xl --facts 1000 --window 10 --samples 10

The default model is the offline fact model (4 layers: windows of 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_rome.data import KnownFactsDataModule
from lightning_rome.modules import CausalTracer
from lightning_rome.tracing import suggest_edit_layer
from lightning_rome.tracing.plot import plot_average, save_figure


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub name or local folder (default: the "
                   "offline fact model)")
    p.add_argument("--data", default=None, help="known_1000.json (default: under "
                   "$LIGHTNING_ROME_DATA)")
    p.add_argument("--facts", type=int, default=6, help="how many facts to trace")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--samples", type=int, default=3, help="noise samples per prompt")
    p.add_argument("--out", default="outputs/trace-dataset")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model is None:
        from lightning_rome.testing import get_fact_model

        fm = get_fact_model()
        model, tok = fm.model, fm.tokenizer
    else:
        from lightning_rome.models import load_model

        model, tok = load_model(args.model)
    out = Path(args.out)
    tracer = CausalTracer(model, tok, kinds=("hidden", "mlp", "attn"), window=args.window,
                          samples=args.samples, save_dir=str(out))
    dm = KnownFactsDataModule(args.data, limit=args.facts)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(tracer, datamodule=dm, verbose=False)
    mlp = tracer.aggregates["mlp"]
    layer = suggest_edit_layer(mlp)
    plot = save_figure(plot_average(mlp), out / "average-mlp.png")
    print(f"{mlp.n_prompts} facts traced: ATE {mlp.ate:.3f}; the MLP effect at the last subject "
          f"token peaks at layer {layer} (suggested edit layer)\nplot: {plot}")
    return {"aggregates": tracer.aggregates, "suggested_layer": layer, "plot": plot,
            "n_prompts": mlp.n_prompts}


if __name__ == "__main__":
    main()
